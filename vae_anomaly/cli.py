"""The `vae-anomaly` command: a thin click layer over `Detector`.

Options become one config object; results go to stdout (a rich table, or
JSON / JSONL / CSV); progress, warnings and errors go to stderr. Exit codes
are those of `report.Report.return_code`, plus 2 for usage and model errors.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .artifact import ModelFileError
from .calibration import TAILS, guarantee
from .detector import CROSS_FIT_BELOW, DEFAULT_FOLDS, CalibrationError, Detector, FitConfig, FitError
from .images import InputPathError
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
from .train import EpochStats, TrainingError

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class UsageFailure(click.ClickException):
    """A user error: bad option, missing path, unreadable or incompatible model. Exit code 2."""

    exit_code = 2


def _warn(msg: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(msg)}")


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
@click.option("--latent-dim", type=click.IntRange(1, 4096), default=16, show_default=True)
@click.option(
    "--likelihood",
    type=click.Choice(LIKELIHOODS),
    default="gaussian",
    show_default=True,
    help="Decoder p(x|z). Gaussian has a learned scale; Bernoulli favours simple images.",
)
@click.option(
    "--epochs",
    type=click.IntRange(1),
    default=30,
    show_default=True,
    help="Upper bound; early stopping on held-out images usually ends sooner.",
)
@click.option("--time-budget", type=click.FloatRange(0, min_open=True), help="Stop training after this many seconds.")
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True)
@click.option(
    "--learning-rate", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=1e-3, show_default=True
)
@click.option(
    "--patience",
    type=click.IntRange(1),
    default=5,
    show_default=True,
    help="Epochs without held-out improvement before stopping.",
)
@click.option(
    "--calibration-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.2,
    show_default=True,
    help="Share of the normal images held out to calibrate p-values.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, data and options: same model on CPU.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option(
    "--max-unreadable-fraction",
    type=click.FloatRange(0, 1),
    default=0.1,
    show_default=True,
    help="Fail when more of the training files than this cannot be read.",
)
@click.option(
    "--folds",
    type=click.IntRange(1, 20),
    help=f"Cross-fit K models on K folds, every image then calibrates. Default: {DEFAULT_FOLDS} below "
    f"{CROSS_FIT_BELOW} readable images, else 1 (one model, --calibration-fraction held out).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
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
    device: str,
    max_unreadable_fraction: float,
    folds: int | None,
    quiet: bool,
) -> None:
    """Train on INPUTS (folders or files of normal images) and write a model file."""
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
            max_unreadable_fraction=max_unreadable_fraction,
            folds=folds,
        )
    except ValueError as exc:
        raise UsageFailure(str(exc)) from None
    detector = Detector(config)
    t0 = time.perf_counter()
    with _FitProgress(quiet) as progress:
        try:
            detector.fit(list(inputs), on_epoch=progress.update, on_warning=_warn, on_model=progress.new_model)
        except (InputPathError, FitError, ValueError) as exc:
            raise UsageFailure(str(exc)) from None
        except TrainingError as exc:
            raise click.ClickException(str(exc)) from None
    seconds = time.perf_counter() - t0
    checksum = detector.save(output)
    tr = detector.metadata_["training"]
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
    smallest = detector.smallest_p_value("elbo", "upper")
    err.print(
        f"[green]wrote[/] {escape(str(output))}: {how}; smallest reachable p-value {smallest:.4g} "
        f"({2 * smallest:.4g} two-sided); {seconds:.1f} s; fingerprint {checksum[:16]}",
        highlight=False,
    )


class _FitProgress:
    """A rich progress bar on a terminal, one line per epoch elsewhere (CI logs)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
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
        elif not self.quiet:
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
    fdr: float | None = None
    junit: Path | None = None
    baseline: Path | None = None


def _parse_threshold(ctx: click.Context, param: click.Parameter, value: str) -> str | float:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"expected 'auto' or a number, got {value!r}", ctx, param) from None


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-m", "--model", type=click.Path(path_type=Path), default=Path("model.vae"), show_default=True)
@click.option("--score", "score_name", type=click.Choice(SCORE_NAMES), default="elbo", show_default=True)
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
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write results here instead of stdout (format from --format, or the file's extension).",
)
@click.option(
    "--gate",
    "gate_specs",
    multiple=True,
    metavar="RULE=LIMIT[,...]",
    help="Gate rules, exit 1 when any fails: "
    + ", ".join(f"{k} ({v[0]}; fails when {v[1]})" for k, v in GATE_RULES.items())
    + ". Repeatable or comma separated.",
)
@click.option("--max-anomalies", type=click.IntRange(0), help="Same as --gate max-count=N.")
@click.option("--max-anomaly-rate", type=click.FloatRange(0, 1), help="Same as --gate max-rate=R.")
@click.option(
    "--baseline",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A previous accepted JSON report of this model: test this batch's scores against it (gate rule drift-p).",
)
@click.option(
    "--junit",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write JUnit XML here: one test case per image, flagged and unreadable ones fail.",
)
@click.option("--skip-unreadable", is_flag=True, help="Unreadable inputs are reported but do not exit 3.")
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option(
    "--top", type=click.IntRange(0), default=30, show_default=True, help="Rows in the terminal table (0: all)."
)
def score(
    inputs: tuple[Path, ...],
    model: Path,
    score_name: str,
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
    batch_size: int,
    device: str,
    top: int,
) -> None:
    """Score INPUTS (folders or files) against a model; flag and gate."""
    if output is not None and fmt == "table":
        fmt = {".json": "json", ".jsonl": "jsonl", ".csv": "csv"}.get(output.suffix.lower(), "")
        if not fmt:
            raise UsageFailure(f"--output {output}: say which format with --format json|jsonl|csv")
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
    if fdr is not None and threshold != "auto":
        raise UsageFailure("--fdr chooses the flags itself; drop --threshold NUMBER, or drop --fdr")
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
        fdr,
        junit,
        baseline,
    )
    report = run_score(opts)
    sys.exit(report.return_code)


def run_score(opts: ScoreOptions) -> Report:
    try:
        detector = Detector.load(opts.model, device=opts.device)
    except ModelFileError as exc:
        raise UsageFailure(str(exc)) from None
    except ValueError as exc:
        raise UsageFailure(str(exc)) from None
    t0 = time.perf_counter()
    try:
        result = detector.score(list(opts.inputs), score=opts.score, samples=opts.samples, batch_size=opts.batch_size)
    except InputPathError as exc:
        raise UsageFailure(str(exc)) from None
    seconds = time.perf_counter() - t0
    if not result.paths and not result.errors:
        raise UsageFailure(
            f"no image files found in {', '.join(map(str, opts.inputs))} ({result.ignored} hidden or non-image "
            "files ignored); supported: PNG, JPEG, BMP, GIF, TIFF, WebP"
        )
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
    for w in decision.warnings:
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
        warnings=decision.warnings,
        tests=tests,
        guarantee=guarantee(decision.threshold),
        models=detector.n_models,
        smallest_p_value=detector.smallest_p_value(opts.score, opts.tail),
        baseline=None if opts.baseline is None else str(opts.baseline),
    )
    for e in result.errors:
        err.print(f"[red]unreadable:[/] {escape(e.path)}: {escape(e.reason)}", highlight=False)
    n = len(result.paths) + len(result.errors)
    err.print(
        f"scored {len(result.paths)} of {n} images in {seconds:.2f} s "
        f"({len(result.paths) / max(seconds, 1e-9):,.0f} images/s)",
        highlight=False,
    )
    if opts.format == "table":
        _render_table(report, opts.top)
    else:
        text = WRITERS[opts.format](report)
        if opts.output is not None:
            opts.output.write_text(text, encoding="utf-8")
            err.print(f"wrote {escape(str(opts.output))}")
        else:
            click.echo(text, nl=False)
    if opts.junit is not None:
        _write(opts.junit, to_junit(report), "JUnit XML")
    if os.environ.get("GITHUB_ACTIONS"):
        _github(report)
    return report


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
            f"{tr['seconds']:.1f} s, seed {tr['seed']}, {tr['device']}",
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
