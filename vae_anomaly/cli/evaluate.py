"""`vae-anomaly evaluate`: detection quality on labelled images."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from ..decision.calibration import TAILS
from ..detector import Detector
from ..errors import UsageError
from ..evaluation import evaluate_detector, evaluation_plots, labelled_folders, labels_csv
from ..images.batching import DecodeOptions
from ..model.score_table import SCORE_NAMES
from ..reports import visualize
from .options import checks_option, decode_options, guard_option
from .render import evaluation_table, say, warn
from .settings import config_option


@click.command()
@config_option
@click.argument("path", required=False, type=click.Path(path_type=Path))
@click.option("-m", "--model", type=click.Path(path_type=Path), default=Path("model.vae"), show_default=True)
@click.option(
    "--labels",
    type=click.Path(dir_okay=False, path_type=Path),
    help="CSV with columns path,label (1 = anomaly); relative paths are read from the CSV's folder.",
)
@click.option(
    "--score",
    "score_names",
    type=click.Choice(SCORE_NAMES),
    multiple=True,
    help="Score type to evaluate; repeat for several. Default: all.",
)
@click.option(
    "--fpr",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.01,
    show_default=True,
    help="Target false-positive rate of the auto threshold behind the confusion matrix.",
)
@click.option(
    "--tail",
    type=click.Choice(TAILS),
    default=None,
    help="Side of the model's score; default: the model's own (two-sided for pixels, upper for the backbone).",
)
@guard_option("The guard statistic of the auto rule behind the confusion matrix, as in `score`.")
@click.option(
    "--strict-fpr/--no-strict-fpr",
    default=False,
    help="As in `score`: flag nothing where the calibration cannot reach --fpr.",
)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option(
    "--plots",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write score histograms, ROC and precision-recall curves here (PNG).",
)
@click.option(
    "--skip-unreadable/--no-skip-unreadable", default=False, help="Unreadable inputs are listed but do not exit 3."
)
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@checks_option
@decode_options
def evaluate(
    path: Path | None,
    model: Path,
    labels: Path | None,
    score_names: tuple[str, ...],
    fpr: float,
    tail: str | None,
    guard: str,
    strict_fpr: bool,
    fmt: str,
    plots: Path | None,
    skip_unreadable: bool,
    batch_size: int,
    device: str,
    checks: bool,
    decode: DecodeOptions,
) -> None:
    """Measure detection quality on labelled images.

    PATH is a folder with normal/ and anomaly/ subfolders; or give --labels FILE.csv instead.
    Exit 0 on success, 2 on a usage error, 3 when some inputs could not be read.
    """
    if (path is None) == (labels is None):
        raise UsageError(
            "give either PATH (a folder with normal/ and anomaly/ inside) or --labels FILE.csv, not both or neither"
        )
    if plots:
        visualize.check_available()
    data = labelled_folders(path) if path is not None else labels_csv(labels)  # type: ignore[arg-type]
    detector = Detector.load(model, device=device, decode=decode)
    names = list(dict.fromkeys(score_names or SCORE_NAMES))
    t0 = time.perf_counter()
    ev = evaluate_detector(
        detector,
        data,
        scores=names,
        fpr=fpr,
        tail=tail,
        guard=None if guard == "none" else guard,
        strict=strict_fpr,
        checks=checks,
        batch_size=batch_size,
    )
    for e in ev.unreadable:
        say(f"unreadable: {e.path}: {e.reason}")
    for w in ev.warnings:
        warn(w)
    say(
        f"evaluated {len(ev.paths)} images ({int((ev.labels == 0).sum())} normal, {int((ev.labels == 1).sum())} "
        f"anomalous) with {len(names)} score type(s) in {time.perf_counter() - t0:.2f} s"
    )
    if fmt == "json":
        click.echo(json.dumps(ev.to_dict(), indent=2))
    else:
        evaluation_table(ev)
    if plots:
        evaluation_plots(ev, plots, say)
    sys.exit(3 if ev.unreadable and not skip_unreadable else 0)
