"""The `vae-anomaly` command: a thin click layer over `Detector`.

Options become one config object; results go to stdout (a rich table, or
JSON / JSONL / CSV); progress, warnings and errors go to stderr. Exit codes
are those of `report.Report.return_code`, plus 2 for usage and model errors.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__, distributed, html_report, visualize
from .artifact import ModelFileError
from .calibration import TAILS, Threshold, guarantee
from .detector import (
    CROSS_FIT_BELOW,
    DEFAULT_FOLDS,
    DEFAULT_GUARD,
    DEFAULT_SCORE,
    CalibrationError,
    Detector,
    FitConfig,
    FitError,
    FitInterrupted,
)
from .evaluation import Evaluation, LabelsError, evaluate_detector, labelled_folders, labels_csv
from .images import DEFAULT_MAX_IMAGE_PIXELS, DecodeOptions, InputPathError, default_cache_dir, set_max_image_pixels
from .model import LIKELIHOODS
from .report import (
    FORMATS,
    GATE_RULES,
    WRITERS,
    BaselineError,
    GateRule,
    GateSpecError,
    Report,
    build_report,
    github_annotations,
    github_summary,
    load_baseline,
    parse_gate,
    to_junit,
    verdict_lines,
)
from .scores import SCORE_NAMES
from .shard import (
    MergeError,
    load_shard_report,
    merge_reports,
    parse_shard,
    scoring_options,
    select_shard,
    shard_report,
)
from .train import EpochStats, TrainingError

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


FIT_DEFAULTS = FitConfig()  # the CLI shows and uses the library's defaults; one place to change them


class UsageFailure(click.ClickException):
    """A user error: bad option, missing path, unreadable or incompatible model. Exit code 2."""

    exit_code = 2


def _warn(msg: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(msg)}")


def max_pixels_option(fn: Any) -> Any:
    """Shared by every command that reads images: the decompression-bomb limit."""

    def apply(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
        set_max_image_pixels(value)
        return value

    return click.option(
        "--max-image-pixels",
        type=click.IntRange(1),
        callback=apply,
        expose_value=False,
        help=f"Refuse images whose header declares more pixels (default {DEFAULT_MAX_IMAGE_PIXELS:,}).",
    )(fn)


def decode_options(fn: Any) -> Any:
    """Shared by every command that reads image files: worker processes and the pixel cache.

    The three options reach the command as one `decode: DecodeOptions`.
    """

    @functools.wraps(fn)
    def command(*args: Any, workers: int | None, no_cache: bool, cache_dir: Path | None, **kwargs: Any) -> Any:
        decode = DecodeOptions(workers, not no_cache, None if cache_dir is None else str(cache_dir))
        return fn(*args, decode=decode, **kwargs)

    options = [
        click.option(
            "--workers",
            type=click.IntRange(0),
            help="Processes that decode images (0: in this process). Default: one per CPU left free, "
            "for 1024 files or more.",
        ),
        click.option(
            "--no-cache",
            is_flag=True,
            help="Neither read nor write the cache of decoded pixels (files are found again by path, size "
            "and modification time).",
        ),
        click.option(
            "--cache-dir",
            type=click.Path(file_okay=False, path_type=Path),
            help=f"Where decoded pixels are cached (default $VAE_ANOMALY_CACHE_DIR or {default_cache_dir()}).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def report_options(fn: Any) -> Any:
    """Shared by `score` and `merge`: the output format and file, the gate, and the CI reports."""
    options = [
        click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True),
        click.option(
            "-o",
            "--output",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Write results here instead of stdout (format from --format, or the file's extension).",
        ),
        click.option(
            "--gate",
            "gate_specs",
            multiple=True,
            metavar="RULE=LIMIT[,...]",
            help="Gate rules over the batch, exit 1 when any fails: "
            + ", ".join(f"{k} ({v[0]}; fails when {v[1]})" for k, v in GATE_RULES.items())
            + ". Repeatable or comma separated.",
        ),
        click.option("--max-anomalies", type=click.IntRange(0), help="Same as --gate max-count=N."),
        click.option("--max-anomaly-rate", type=click.FloatRange(0, 1), help="Same as --gate max-rate=R."),
        click.option(
            "--baseline",
            type=click.Path(dir_okay=False, path_type=Path),
            help="A previous accepted JSON report of this model: test the batch's scores against it "
            "(gate rule drift-p).",
        ),
        click.option(
            "--junit",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Also write JUnit XML here: one test case per image, flagged and unreadable ones fail.",
        ),
        click.option("--skip-unreadable", is_flag=True, help="Unreadable inputs are reported but do not exit 3."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vae-anomaly")
def main() -> None:
    """Flag images that do not look like a folder of known-normal ones.

    \b
      vae-anomaly fit ./normal_imgs -o model.vae
      vae-anomaly score ./incoming --model model.vae --threshold auto
    """


# ------------------------------------------------------------------- fit
@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("model.vae"),
    show_default=True,
    help="Model file to write.",
)
@click.option("--image-size", type=click.IntRange(4, 1024), help="Square input side; default: from the data.")
@click.option("--latent-dim", type=click.IntRange(1, 4096), default=FIT_DEFAULTS.latent_dim, show_default=True)
@click.option(
    "--likelihood",
    type=click.Choice(LIKELIHOODS),
    default=FIT_DEFAULTS.likelihood,
    show_default=True,
    help="Decoder p(x|z). Gaussian has a learned scale; Bernoulli favours simple images.",
)
@click.option(
    "--epochs",
    type=click.IntRange(1),
    help="Upper bound; early stopping on held-out images usually ends sooner. "
    "Default: 50, or enough for 600 steps on small data sets.",
)
@click.option("--time-budget", type=click.FloatRange(0, min_open=True), help="Stop training after this many seconds.")
@click.option("--batch-size", type=click.IntRange(1), default=FIT_DEFAULTS.batch_size, show_default=True)
@click.option(
    "--learning-rate",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=FIT_DEFAULTS.learning_rate,
    show_default=True,
)
@click.option(
    "--patience",
    type=click.IntRange(1),
    default=FIT_DEFAULTS.patience,
    show_default=True,
    help="Epochs without held-out improvement before stopping.",
)
@click.option(
    "--calibration-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=FIT_DEFAULTS.calibration_fraction,
    show_default=True,
    help="Share of the normal images held out to calibrate p-values.",
)
@click.option(
    "--seed",
    type=int,
    default=FIT_DEFAULTS.seed,
    show_default=True,
    help="Same seed, data and options: same model on CPU.",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16"]),
    default=FIT_DEFAULTS.precision,
    show_default=True,
    help="Training arithmetic: bf16 runs the forward pass under bf16 autocast (for larger images on "
    "GPUs; slower for small ones, see README). Scores are always float32.",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option(
    "--max-unreadable-fraction",
    type=click.FloatRange(0, 1),
    default=FIT_DEFAULTS.max_unreadable_fraction,
    show_default=True,
    help="Fail when more of the training files than this cannot be read.",
)
@click.option("--resume", is_flag=True, help="Continue from the checkpoint OUTPUT.ckpt of an interrupted run.")
@click.option(
    "--checkpoint-every",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
    help="Seconds between checkpoints (written at epoch ends to OUTPUT.ckpt).",
)
@click.option(
    "--folds",
    type=click.IntRange(1, 20),
    help=f"Cross-fit K models on K folds, every image then calibrates. Default: {DEFAULT_FOLDS} below "
    f"{CROSS_FIT_BELOW} readable images, else 1 (one model, --calibration-fraction held out).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@max_pixels_option
@decode_options
def fit(
    inputs: tuple[Path, ...],
    output: Path,
    image_size: int | None,
    latent_dim: int,
    likelihood: str,
    epochs: int,
    time_budget: float | None,
    batch_size: int,
    learning_rate: float,
    patience: int,
    calibration_fraction: float,
    seed: int,
    precision: str,
    device: str,
    max_unreadable_fraction: float,
    resume: bool,
    checkpoint_every: float,
    folds: int | None,
    quiet: bool,
    decode: DecodeOptions,
) -> None:
    """Train on INPUTS (folders or files of normal images) and write a model file.

    Ctrl-C or SIGTERM stops after the current step and writes the best model so
    far (exit code 128 + signal number); a second Ctrl-C aborts without writing.

    Under torchrun (`torchrun --nproc-per-node N -m vae_anomaly fit ...`) the N
    processes train together with DistributedDataParallel (gloo on CPU, one
    GPU each with NCCL), each on its slice of every batch; rank 0 alone shows
    progress and writes the checkpoint and the model file.
    """
    try:
        config = FitConfig(
            image_size=image_size,
            latent_dim=latent_dim,
            likelihood=likelihood,
            epochs=epochs,
            time_budget=time_budget,
            batch_size=batch_size,
            learning_rate=learning_rate,
            patience=patience,
            calibration_fraction=calibration_fraction,
            seed=seed,
            device=device,
            precision=precision,
            max_unreadable_fraction=max_unreadable_fraction,
            folds=folds,
            decode=decode,
        )
    except ValueError as exc:
        raise UsageFailure(str(exc)) from None
    try:
        world = distributed.init(device) if distributed.launched() else distributed.World()
    except distributed.DistributedError as exc:
        raise UsageFailure(str(exc)) from None
    try:
        _fit(Detector(config), inputs, output, resume, checkpoint_every, quiet, world)
    finally:
        distributed.destroy()


def _fit(
    detector: Detector,
    inputs: tuple[Path, ...],
    output: Path,
    resume: bool,
    checkpoint_every: float,
    quiet: bool,
    world: distributed.World,
) -> None:
    """`fit` after its options are checked: train, save on rank 0, report on rank 0."""
    main_rank = world.is_main
    checkpoint = output.with_name(output.name + ".ckpt")
    t0 = time.perf_counter()
    with _StopOnSignal(announce=main_rank) as stop, _FitProgress(quiet or not main_rank) as progress:
        try:
            detector.fit(
                list(inputs),
                on_epoch=progress.update,
                on_warning=_warn if main_rank else None,
                should_stop=stop.requested,
                checkpoint=checkpoint,
                resume=resume,
                checkpoint_every=checkpoint_every,
                on_model=progress.new_model,
            )
            seconds = time.perf_counter() - t0
            checksum = detector.save(output) if main_rank else ""
        except (InputPathError, FitError, ValueError, ModelFileError) as exc:
            raise UsageFailure(str(exc)) from None
        except TrainingError as exc:
            raise click.ClickException(str(exc)) from None
        except FitInterrupted as exc:
            if main_rank:
                err.print(f"[yellow]interrupted[/]: {escape(str(exc))}")
            sys.exit(128 + (stop.signum or signal.SIGINT))
        except KeyboardInterrupt:
            err.print("[red]aborted[/]: no model file written; `fit --resume` continues from the last checkpoint")
            sys.exit(130)
    # The others wait for rank 0's file, so that every process of the job ends after it is written.
    world.barrier()
    tr = detector.metadata_["training"]
    if not main_rank:
        if stop.signum is not None:
            sys.exit(128 + stop.signum)
        return
    if stop.signum is not None:
        err.print(
            f"[yellow]interrupted[/] at epoch {tr['epochs_run']}: wrote the best model so far to "
            f"{escape(str(output))} (best epoch {tr['best_epoch']}); `fit --resume` with the same options "
            "continues training from the last checkpoint."
        )
        sys.exit(128 + stop.signum)
    checkpoint.unlink(missing_ok=True)
    k = detector.n_models
    if k > 1:
        how = (
            f"{k} cross-fitted models, each on {tr['train_images']} training and {tr['validation_images']} "
            f"validation images; all {tr['calibration_images']} images calibrate (each scored by the model "
            "that did not see it)"
        )
    else:
        how = (
            f"{tr['train_images']} training, {tr['validation_images']} validation, {tr['calibration_images']} "
            f"calibration images; {tr['epochs_run']} epochs ({tr['stopped']}, best epoch {tr['best_epoch']})"
        )
    if world.size > 1:
        how += f"; trained by {world.size} processes"
    smallest = detector.smallest_p_value(DEFAULT_SCORE, "upper")
    err.print(
        f"[green]wrote[/] {escape(str(output))}: {how}; smallest reachable p-value {smallest:.4g} "
        f"({2 * smallest:.4g} two-sided); {seconds:.1f} s; fingerprint {checksum[:16]}",
        highlight=False,
    )


class _StopOnSignal:
    """First Ctrl-C or SIGTERM: ask training to stop after this step. Second: abort at once.

    torchrun passes a Ctrl-C on to every process once; `announce` is False on
    all but rank 0, so that the message is printed once.
    """

    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self.announce = announce
        self._old: dict[int, Any] = {}

    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:
            err.print(
                f"\n[yellow]{signal.Signals(signum).name}[/]: stopping after this step and writing the best model so "
                "far (Ctrl-C again aborts without writing)"
            )

    def __enter__(self) -> _StopOnSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (an embedding application): no handlers
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _FitProgress:
    """A rich progress bar on a terminal, one line per epoch elsewhere (CI logs)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.last_line = -1e9
        self.bar: Progress | None = None
        self.task: Any = None

    def __enter__(self) -> _FitProgress:
        if not self.quiet and err.is_terminal:
            self.bar = Progress(
                TextColumn("epoch {task.fields[epoch]}"),
                BarColumn(),
                TextColumn("loss {task.fields[loss]} KL {task.fields[kl]} val {task.fields[val]}"),
                TextColumn("{task.fields[rate]} img/s"),
                TimeRemainingColumn(),
                console=err,
            )
            self.bar.start()
            self.task = self.bar.add_task("fit", total=None, epoch="-", loss="-", kl="-", val="-", rate="-")
        return self

    def new_model(self, k: int, folds: int) -> None:
        self.last_line = -1e9  # each model's clock starts at zero
        if folds > 1 and not self.quiet:
            if self.bar is not None:
                self.bar.update(self.task, description=f"model {k + 1}/{folds}")
            err.print(f"cross-fitting: model {k + 1} of {folds} (fold {k + 1} held out)", highlight=False)

    def update(self, s: EpochStats) -> None:
        val = "-" if s.val_loss is None else f"{s.val_loss:.2f}"
        if self.bar is not None:
            total = s.elapsed + (s.remaining or 0.0)
            self.bar.update(
                self.task,
                total=total,
                completed=s.elapsed,
                epoch=f"{s.epoch}/{s.epochs}",
                loss=f"{s.train_loss:.2f}",
                kl=f"{s.train_kl:.2f}",
                val=val,
                rate=f"{s.images_per_s:,.0f}",
            )
        elif not self.quiet and (s.epoch <= 3 or s.epoch == s.epochs or s.elapsed - self.last_line >= 2.0):
            # CI logs: the first epochs, then at most one line every two seconds.
            self.last_line = s.elapsed
            err.print(
                f"epoch {s.epoch}/{s.epochs}  loss {s.train_loss:.3f}  KL {s.train_kl:.3f}  val {val}  "
                f"{s.images_per_s:,.0f} img/s  {s.elapsed:.1f} s",
                highlight=False,
            )

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


# ----------------------------------------------------------------- score
@dataclass(frozen=True)
class ScoreOptions:
    """Every option of `score`, checked once; only this travels past the parser."""

    inputs: tuple[Path, ...]
    model: Path
    score: str
    samples: int | None
    threshold: str | float
    fpr: float
    tail: str
    format: str
    output: Path | None
    gate: tuple[GateRule, ...]
    skip_unreadable: bool
    batch_size: int
    device: str
    top: int
    heatmaps: Path | None = None
    plots: Path | None = None
    html: Path | None = None
    html_top: int = 50
    fdr: float | None = None
    junit: Path | None = None
    baseline: Path | None = None
    guard: str = "kl"
    shard: tuple[int, int] | None = None  # (I, N): score only the I-th of N parts of the listing
    decode: DecodeOptions = field(default_factory=DecodeOptions)


def _parse_threshold(ctx: click.Context, param: click.Parameter, value: str) -> str | float:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"expected 'auto' or a number, got {value!r}", ctx, param) from None


def _parse_shard(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        return parse_shard(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def _gate_from_options(
    gate_specs: tuple[str, ...], max_anomalies: int | None, max_anomaly_rate: float | None, baseline: Path | None
) -> list[GateRule]:
    """--gate, --max-anomalies and --max-anomaly-rate as one list of rules (score and merge share them)."""
    specs = list(gate_specs)
    if max_anomalies is not None:
        specs.append(f"max-count={max_anomalies}")
    if max_anomaly_rate is not None:
        specs.append(f"max-rate={max_anomaly_rate!r}")
    try:
        gate = parse_gate(specs)
    except GateSpecError as exc:
        raise click.BadParameter(str(exc), param_hint="'--gate'") from None
    if any(r.name == "drift-p" for r in gate) and baseline is None:
        raise UsageFailure("gate rule drift-p compares with a previous batch: pass --baseline previous.json")
    return gate


def _output_format(output: Path | None, fmt: str) -> str:
    """With --output and no --format, the format comes from the file's extension."""
    if output is not None and fmt == "table":
        fmt = {".json": "json", ".jsonl": "jsonl", ".csv": "csv"}.get(output.suffix.lower(), "")
        if not fmt:
            raise UsageFailure(f"--output {output}: say which format with --format json|jsonl|csv")
    return fmt


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-m", "--model", type=click.Path(path_type=Path), default=Path("model.vae"), show_default=True)
@click.option(
    "--score",
    "score_name",
    type=click.Choice(SCORE_NAMES),
    default=DEFAULT_SCORE,
    show_default=True,
    help="elbo-ic: -ELBO in bits minus the PNG length (complexity-corrected); see README for all.",
)
@click.option(
    "--guard",
    type=click.Choice(["kl", "none"]),
    default=DEFAULT_GUARD,
    show_default=True,
    help="A second two-sided test on the latent KL, Bonferroni-combined: catches shrunk, noisy, dim frames.",
)
@click.option(
    "--samples", type=click.IntRange(1, 10_000), help="Monte Carlo samples; default: the model's calibration."
)
@click.option(
    "--threshold",
    default="auto",
    show_default=True,
    callback=_parse_threshold,
    help="'auto' flags conformal p <= --fpr; a number flags scores at or above it.",
)
@click.option(
    "--fpr",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.01,
    show_default=True,
    help="Target false-positive rate for --threshold auto.",
)
@click.option(
    "--fdr",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Flag by Benjamini-Hochberg at this false discovery rate over the batch, instead of p <= --fpr.",
)
@click.option(
    "--tail",
    type=click.Choice(TAILS),
    default="two-sided",
    show_default=True,
    help="two-sided also flags images too simple to be normal (blank, tiny, cropped).",
)
@report_options
@click.option(
    "--shard",
    metavar="I/N",
    callback=_parse_shard,
    help="Score only the I-th of N parts of the sorted listing (round robin) and write a JSON report "
    "for `vae-anomaly merge`, which gates the whole batch.",
)
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option(
    "--top", type=click.IntRange(0), default=30, show_default=True, help="Rows in the terminal table (0: all)."
)
@click.option(
    "--heatmaps",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write a PNG per flagged image here: input | reconstruction | heat map.",
)
@click.option("--plots", type=click.Path(file_okay=False, path_type=Path), help="Write the score histogram here (PNG).")
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a self-contained HTML report (verdict, summary, histogram, top images).",
)
@click.option(
    "--html-top",
    type=click.IntRange(0),
    default=50,
    show_default=True,
    help="Most anomalous images shown, with pictures, in the HTML report.",
)
@max_pixels_option
@decode_options
def score(
    inputs: tuple[Path, ...],
    model: Path,
    score_name: str,
    guard: str,
    samples: int | None,
    threshold: str | float,
    fpr: float,
    tail: str,
    fdr: float | None,
    fmt: str,
    output: Path | None,
    gate_specs: tuple[str, ...],
    max_anomalies: int | None,
    max_anomaly_rate: float | None,
    baseline: Path | None,
    junit: Path | None,
    skip_unreadable: bool,
    shard: tuple[int, int] | None,
    batch_size: int,
    device: str,
    top: int,
    heatmaps: Path | None,
    plots: Path | None,
    html_path: Path | None,
    html_top: int,
    decode: DecodeOptions,
) -> None:
    """Score INPUTS (folders or files) against a model; flag and gate.

    With --shard I/N, score only one part of the listing and write a JSON report that
    `vae-anomaly merge` joins with the other parts' (the gate is decided there, over all of them).
    """
    fmt = _output_format(output, fmt)
    gate = _gate_from_options(gate_specs, max_anomalies, max_anomaly_rate, baseline)
    if fdr is not None and threshold != "auto":
        raise UsageFailure("--fdr chooses the flags itself; drop --threshold NUMBER, or drop --fdr")
    if shard is not None and gate:
        raise UsageFailure(
            "--shard scores part of the batch, and the gate is decided over all of it: drop --gate, --max-anomalies "
            "and --max-anomaly-rate here and pass them to `vae-anomaly merge shard-*.json --gate ...`"
        )
    if shard is not None and fmt != "json":
        raise UsageFailure(
            "--shard writes a JSON report for `vae-anomaly merge`: add --format json and "
            f"--output shard-{shard[0]}.json"
        )
    opts = ScoreOptions(
        inputs,
        model,
        score_name,
        samples,
        threshold,
        fpr,
        tail,
        fmt,
        output,
        tuple(gate),
        skip_unreadable,
        batch_size,
        device,
        top,
        heatmaps,
        plots,
        html_path,
        html_top,
        fdr,
        junit,
        baseline,
        guard,
        shard,
        decode,
    )
    report = run_score(opts)
    sys.exit(report.return_code)


def run_score(opts: ScoreOptions) -> Report:
    if opts.heatmaps or opts.plots or opts.html:
        _need_matplotlib()
    try:
        detector = Detector.load(opts.model, device=opts.device, decode=opts.decode)
    except (ModelFileError, ValueError) as exc:
        raise UsageFailure(str(exc)) from None
    t0 = time.perf_counter()
    try:
        shard = None if opts.shard is None else select_shard(list(opts.inputs), *opts.shard)
        result = detector.score(
            list(opts.inputs) if shard is None else shard.listing,
            score=opts.score,
            samples=opts.samples,
            batch_size=opts.batch_size,
            guard=None if opts.guard == "none" else opts.guard,
            on_warning=_warn,
        )
    except InputPathError as exc:
        raise UsageFailure(str(exc)) from None
    seconds = time.perf_counter() - t0
    baseline_scores = None
    if opts.baseline is not None:
        try:
            baseline_scores = load_baseline(opts.baseline, detector.fingerprint, opts.score)
        except BaselineError as exc:
            raise UsageFailure(str(exc)) from None
    try:
        decision = detector.decide(result, threshold=opts.threshold, fpr=opts.fpr, tail=opts.tail, fdr=opts.fdr)
    except CalibrationError as exc:
        raise UsageFailure(str(exc)) from None
    for w in [*result.warnings, *decision.warnings]:
        _warn(w)
    tests = detector.batch_tests(result, decision, fpr=opts.fpr, tail=opts.tail, baseline=baseline_scores)
    report = build_report(
        result.paths,
        result.scores,
        decision.p_values,
        decision.flags,
        [(e.path, e.reason) for e in result.errors],
        threshold=decision.threshold,
        calibration=detector.calibration_[opts.score],
        score=opts.score,
        samples=result.samples,
        ignored=result.ignored,
        fingerprint=detector.fingerprint,
        gate=list(opts.gate),
        skip_unreadable=opts.skip_unreadable,
        warnings=[*result.warnings, *decision.warnings],
        tests=tests,
        guarantee=guarantee(decision.threshold),
        models=detector.n_models,
        smallest_p_value=detector.smallest_p_value(
            opts.score, opts.tail, None if result.guard is None else result.guard.score
        ),
        baseline=None if opts.baseline is None else str(opts.baseline),
    )
    of_listing = ""
    if shard is not None:
        report = shard_report(
            report,
            shard,
            options=scoring_options(
                score=opts.score,
                samples=result.samples,
                tail=opts.tail,
                threshold=opts.threshold,
                fpr=opts.fpr,
                fdr=opts.fdr,
                guard=opts.guard,
            ),
            calibration=detector.calibration_[opts.score],
            paths=result.paths,
            model_scores=result.model_scores,
            unlike=result.unlike,
            decision_warnings=decision.warnings,
        )
        of_listing = f" (shard {shard.index}/{shard.count} of a listing of {shard.total})"
    for e in result.errors:
        err.print(f"[red]unreadable:[/] {escape(e.path)}: {escape(e.reason)}", highlight=False)
    n = len(result.paths) + len(result.errors)
    err.print(
        f"scored {len(result.paths)} of {n} images{of_listing} in {seconds:.2f} s "
        f"({len(result.paths) / max(seconds, 1e-9):,.0f} images/s)",
        highlight=False,
    )
    _emit(report, opts.format, opts.output, opts.top)
    _write_visuals(detector, opts, report, decision.threshold)
    # A shard's flags and verdict are about part of the batch: the merge job annotates and summarises.
    _emit_ci(report, opts.junit, github=shard is None)
    return report


def _emit(report: Report, fmt: str, output: Path | None, top: int) -> None:
    """The report on stdout (a table, or JSON / JSONL / CSV), or in --output."""
    if fmt == "table":
        _render_table(report, top)
        return
    text = WRITERS[fmt](report)
    if output is not None:
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise UsageFailure(f"cannot write the report to {output}: {exc.strerror or exc}") from None
        err.print(f"wrote {escape(str(output))}")
    else:
        click.echo(text, nl=False)


def _emit_ci(report: Report, junit: Path | None, github: bool = True) -> None:
    """JUnit XML when asked; annotations and the job summary on GitHub Actions."""
    if junit is not None:
        _write(junit, to_junit(report), "JUnit XML")
    if github and os.environ.get("GITHUB_ACTIONS"):
        _github(report)


# ----------------------------------------------------------------- merge
@main.command()
@click.argument("reports", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-m",
    "--model",
    type=click.Path(path_type=Path),
    help="Also check that the shards were scored by this model file (by fingerprint).",
)
@report_options
@click.option(
    "--top", type=click.IntRange(0), default=30, show_default=True, help="Rows in the terminal table (0: all)."
)
def merge(
    reports: tuple[Path, ...],
    model: Path | None,
    fmt: str,
    output: Path | None,
    gate_specs: tuple[str, ...],
    max_anomalies: int | None,
    max_anomaly_rate: float | None,
    baseline: Path | None,
    junit: Path | None,
    skip_unreadable: bool,
    top: int,
) -> None:
    """Join the JSON reports of `score --shard I/N` (all N of them) into one, and gate it.

    The result is the report one unsharded `score` run over the whole listing gives: the same
    records in the same order, with --fdr flags, ranks, batch tests and the gate computed over
    the union. Exit codes as for `score`: 0 pass, 1 gate failed, 2 usage, 3 unreadable inputs.
    """
    fmt = _output_format(output, fmt)
    gate = _gate_from_options(gate_specs, max_anomalies, max_anomaly_rate, baseline)
    fingerprint = None
    if model is not None:
        try:
            fingerprint = Detector.load(model, device="cpu").fingerprint
        except (ModelFileError, ValueError) as exc:
            raise UsageFailure(str(exc)) from None
    try:
        shards = [load_shard_report(path) for path in reports]
        report = merge_reports(
            shards, gate=gate, skip_unreadable=skip_unreadable, baseline=baseline, model_fingerprint=fingerprint
        )
    except (MergeError, BaselineError) as exc:
        raise UsageFailure(str(exc)) from None
    for w in report.warnings:
        _warn(w)
    for r in report.records:
        if r.error is not None:
            err.print(f"[red]unreadable:[/] {escape(r.path)}: {escape(r.error)}", highlight=False)
    s = report.summary
    err.print(f"merged {len(shards)} shard reports: {s.scored} of {s.total} images scored", highlight=False)
    _emit(report, fmt, output, top)
    _emit_ci(report, junit)
    sys.exit(report.return_code)


def _need_matplotlib() -> None:
    try:
        visualize.check_available()
    except visualize.MissingExtraError as exc:
        raise UsageFailure(str(exc)) from None


def _write_png(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot write ({exc.strerror or exc}); check the folder") from None


def _safe_name(path: str) -> str:
    """A file-name fragment from any input path: letters, digits, dot, dash, underscore."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem).strip("._") or "image"
    return stem[:80]


def _write_visuals(detector: Detector, opts: ScoreOptions, report: Report, threshold: Threshold) -> None:
    """Heat maps of flagged images, the histogram, the HTML report: only what was asked for."""
    if not (opts.heatmaps or opts.plots or opts.html):
        return
    ranked = [r for r in report.records if r.error is None]
    s = report.summary
    histogram = None
    if opts.plots or opts.html:
        scores = np.array([r.score for r in ranked])
        histogram = visualize.score_histogram(
            {"calibration (normal)": detector.calibration_[opts.score], "scored batch": scores},
            threshold,
            score=opts.score,
            title=f"{opts.score}: {s.flagged:,} of {s.scored:,} flagged; {s.rule}",
        )
        if opts.plots:
            _write_png(opts.plots / f"histogram_{opts.score}.png", histogram)
            err.print(f"wrote {escape(str(opts.plots / f'histogram_{opts.score}.png'))}", highlight=False)
    wanted = {r.path: r for r in ranked[: opts.html_top]} if opts.html else {}
    flagged = [r for r in ranked if r.flagged] if opts.heatmaps else []
    wanted.update({r.path: r for r in flagged})
    rows: dict[str, html_report.RowImages] = {}
    lut = visualize.colour_table() if wanted else None
    todo = list(wanted.values())
    written = 0
    for i in range(0, len(todo), opts.batch_size):
        chunk = todo[i : i + opts.batch_size]
        maps = detector.heatmap([Path(r.path) for r in chunk], score=opts.score, samples=opts.samples)
        for e in maps.errors:
            _warn(f"no heat map for {e.path}: {e.reason} (it changed since it was scored?)")
        by_path = {r.path: r for r in chunk}
        for j, path in enumerate(maps.paths):
            rec = by_path[path]
            img, rec_img, heat = maps.images[j], maps.reconstructions[j], maps.maps[j]
            if opts.heatmaps and rec.flagged:
                panel = visualize.heatmap_panel(
                    img, rec_img, heat, caption=f"#{rec.rank}  score {rec.score:.4g}  p {rec.p_value:.4f}", lut=lut
                )
                _write_png(opts.heatmaps / f"{rec.rank:05d}_{_safe_name(path)}.png", visualize.png_bytes(panel))
                written += 1
            if opts.html and rec.rank is not None and rec.rank <= opts.html_top:
                rows[path] = html_report.RowImages(
                    visualize.png_bytes(visualize.to_rgb(img)),
                    visualize.png_bytes(visualize.to_rgb(rec_img)),
                    visualize.png_bytes(visualize.heat_overlay(img, heat, lut=lut)),
                )
    if opts.heatmaps:
        opts.heatmaps.mkdir(parents=True, exist_ok=True)
        err.print(f"wrote {written} heat map(s) of flagged images to {escape(str(opts.heatmaps))}", highlight=False)
    if opts.html:
        page = html_report.render_html(
            report,
            histogram=histogram,
            images=rows,
            top=opts.html_top,
            model=str(opts.model),
            inputs=", ".join(map(str, opts.inputs)),
        )
        try:
            opts.html.parent.mkdir(parents=True, exist_ok=True)
            opts.html.write_text(page, encoding="utf-8")
        except OSError as exc:
            raise click.ClickException(f"{opts.html}: cannot write the report ({exc.strerror or exc})") from None
        err.print(f"wrote {escape(str(opts.html))} ({len(page.encode()) / 1024:,.0f} KiB)", highlight=False)


def _write(path: Path, text: str, what: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageFailure(f"cannot write {what} to {path}: {exc.strerror or exc}") from None
    err.print(f"wrote {escape(str(path))} ({what})", highlight=False)


def _github(report: Report) -> None:
    """On GitHub Actions: annotations on stderr, and the Markdown verdict in the job summary."""
    for line in github_annotations(report):
        click.echo(line, err=True)
    summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_file:
        try:
            with open(summary_file, "a", encoding="utf-8") as fh:
                fh.write(github_summary(report))
        except OSError as exc:
            _warn(f"could not append to $GITHUB_STEP_SUMMARY ({summary_file}): {exc.strerror or exc}")


def _render_table(report: Report, top: int) -> None:
    s = report.summary
    scored = [r for r in report.records if r.error is None]
    shown = scored if top == 0 else scored[:top]
    table = Table(title=f"most anomalous first ({s.score}, {s.threshold['tail']})", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("path", overflow="fold")
    table.add_column("score", justify="right")
    table.add_column("p-value", justify="right")
    table.add_column("flag")
    for r in shown:
        table.add_row(
            str(r.rank),
            escape(r.path),
            f"{r.score:.4g}",
            f"{r.p_value:.4f}",
            "[bold red]ANOMALY[/]" if r.flagged else "ok",
        )
    if shown:
        out.print(table)
    if len(scored) > len(shown):
        out.print(f"... {len(scored) - len(shown)} more (use --top 0 or --format json for all)")
    for line in verdict_lines(report):
        out.print(escape(line), highlight=False)


# -------------------------------------------------------------- evaluate
@main.command()
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
@click.option("--tail", type=click.Choice(TAILS), default="two-sided", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option(
    "--plots",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write score histograms, ROC and precision-recall curves here (PNG).",
)
@click.option("--skip-unreadable", is_flag=True, help="Unreadable inputs are listed but do not exit 3.")
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@decode_options
def evaluate(
    path: Path | None,
    model: Path,
    labels: Path | None,
    score_names: tuple[str, ...],
    fpr: float,
    tail: str,
    fmt: str,
    plots: Path | None,
    skip_unreadable: bool,
    batch_size: int,
    device: str,
    decode: DecodeOptions,
) -> None:
    """Measure detection quality on labelled images.

    PATH is a folder with normal/ and anomaly/ subfolders; or give --labels FILE.csv instead.
    Exit 0 on success, 2 on a usage error, 3 when some inputs could not be read.
    """
    if (path is None) == (labels is None):
        raise UsageFailure(
            "give either PATH (a folder with normal/ and anomaly/ inside) or --labels FILE.csv, not both or neither"
        )
    if plots:
        _need_matplotlib()
    try:
        data = labelled_folders(path) if path is not None else labels_csv(labels)  # type: ignore[arg-type]
    except (LabelsError, InputPathError) as exc:
        raise UsageFailure(str(exc)) from None
    try:
        detector = Detector.load(model, device=device, decode=decode)
    except (ModelFileError, ValueError) as exc:
        raise UsageFailure(str(exc)) from None
    names = score_names or SCORE_NAMES
    t0 = time.perf_counter()
    try:
        ev = evaluate_detector(
            detector, data, scores=list(dict.fromkeys(names)), fpr=fpr, tail=tail, batch_size=batch_size
        )
    except (LabelsError, CalibrationError) as exc:
        raise UsageFailure(str(exc)) from None
    for e in ev.unreadable:
        err.print(f"[red]unreadable:[/] {escape(e.path)}: {escape(e.reason)}", highlight=False)
    for w in ev.warnings:
        _warn(w)
    err.print(
        f"evaluated {len(ev.paths)} images ({int((ev.labels == 0).sum())} normal, {int((ev.labels == 1).sum())} "
        f"anomalous) with {len(names)} score type(s) in {time.perf_counter() - t0:.2f} s",
        highlight=False,
    )
    if fmt == "json":
        click.echo(json.dumps(ev.to_dict(), indent=2))
    else:
        _render_evaluation(ev)
    if plots:
        _write_evaluation_plots(ev, plots)
    sys.exit(3 if ev.unreadable and not skip_unreadable else 0)


def _render_evaluation(ev: Evaluation) -> None:
    table = Table(
        title=f"{escape(ev.source)}: {int((ev.labels == 0).sum())} normal, {int((ev.labels == 1).sum())} anomalous",
        title_justify="left",
    )
    table.add_column("metric")
    for name, r in ev.results.items():
        table.add_column(f"{name} ({r.samples})", justify="right")
    res = list(ev.results.values())
    rows = [
        ("ROC-AUC", [f"{r.metrics.roc_auc:.4f}" for r in res]),
        ("average precision", [f"{r.metrics.average_precision:.4f}" for r in res]),
        ("best F1", [f"{r.metrics.best_f1:.4f}" for r in res]),
        ("  at score >=", [f"{r.metrics.best_f1_threshold:.5g}" for r in res]),
        ("  precision / recall", [f"{r.metrics.best_f1_precision:.3f} / {r.metrics.best_f1_recall:.3f}" for r in res]),
        ("TPR at FPR 1%", [f"{r.metrics.tpr_at_fpr_1pct:.4f}" for r in res]),
        ("TPR at FPR 5%", [f"{r.metrics.tpr_at_fpr_5pct:.4f}" for r in res]),
        ("auto rule: TN / FP", [f"{r.confusion.tn} / {r.confusion.fp}" for r in res]),
        ("auto rule: FN / TP", [f"{r.confusion.fn} / {r.confusion.tp}" for r in res]),
        ("auto rule: FPR / TPR", [f"{r.confusion.fpr:.3f} / {r.confusion.tpr:.3f}" for r in res]),
    ]
    for label, cells in rows:
        table.add_row(label, *cells)
    out.print(table)
    out.print(
        "ROC-AUC, AP, best F1 and TPR at FPR rank by the raw score (higher = more anomalous). "
        f"The auto rule is the model's own (--fpr {ev.fpr:g}, --tail {ev.tail}): "
        + "; ".join(f"{n}: {escape(r.threshold.describe())}" for n, r in ev.results.items()),
        highlight=False,
    )


def _write_evaluation_plots(ev: Evaluation, folder: Path) -> None:
    written = []
    for name, r in ev.results.items():
        png = visualize.score_histogram(
            {
                "calibration (normal)": ev.calibration[name],
                "labelled normal": r.scores[ev.labels == 0],
                "labelled anomaly": r.scores[ev.labels == 1],
            },
            r.threshold,
            score=name,
            title=f"{name}: ROC-AUC {r.metrics.roc_auc:.3f}; auto rule at fpr {ev.fpr:g} ({ev.tail})",
        )
        written.append(folder / f"histogram_{name}.png")
        _write_png(written[-1], png)
    scores = {name: r.scores for name, r in ev.results.items()}
    written += [folder / "roc.png", folder / "pr.png"]
    _write_png(written[-2], visualize.roc_curves(ev.labels, scores))
    _write_png(written[-1], visualize.pr_curves(ev.labels, scores))
    err.print(f"wrote {', '.join(escape(str(w)) for w in written)}", highlight=False)


# ------------------------------------------------------------------ info
@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def info(model: Path, fmt: str) -> None:
    """Show what MODEL was trained on and how."""
    try:
        detector = Detector.load(model, device="cpu")
    except ModelFileError as exc:
        raise UsageFailure(str(exc)) from None
    data = detector.info()
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
        return
    table = Table(show_header=False, title=f"model {escape(str(model))}", title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    tr = data["training"]
    cfg = data["config"]
    prep = data["preprocessing"]
    rows = [
        ("fingerprint", data["fingerprint"]),
        ("created", data["created"]),
        (
            "input",
            f"{prep['channels']} channel(s), {prep['size']}x{prep['size']} ({prep['resize']}, {prep['scaling']})",
        ),
        ("network", f"latent {cfg['latent_dim']}, channels {cfg['hidden_channels']}, {cfg['likelihood']} decoder"),
        (
            "images",
            f"{tr['images']} read ({tr['train_images']} train, {tr['validation_images']} validation, "
            f"{tr['calibration_images']} calibration), {tr['unreadable_images']} unreadable",
        ),
        ("data fingerprint", tr["data_fingerprint"]),
        (
            "models",
            f"{data['models']} cross-fitted (each scores the fold it did not see; cross-conformal p-values)"
            if data["models"] > 1
            else "1 (calibration split held out)",
        ),
        (
            "training",
            f"{tr['epochs_run']} epochs ({tr['stopped']}), best epoch {tr['best_epoch']}, "
            f"{tr['seconds']:.1f} s, seed {tr['seed']}, {tr['device']}"
            + (f", {tr['processes']} processes" if tr.get("processes", 1) > 1 else ""),
        ),
        (
            "final losses",
            f"train {tr['final_train_loss']:.4g}, held-out "
            + ("-" if tr["best_val_loss"] is None else f"{tr['best_val_loss']:.4g}"),
        ),
        *[
            (f"calibration {k}", f"{v['n']} scores, {v['samples']} sample(s), median {v['median']:.4g}")
            for k, v in data["calibration"].items()
        ],
        ("versions", ", ".join(f"{k} {v}" for k, v in data["versions"].items())),
    ]
    for k, v in rows:
        table.add_row(k, escape(str(v)))
    out.print(table)
