"""`vae-anomaly fit`: options into a `FitConfig`, training with progress and signals, the model file."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from .. import pipeline, process
from ..config import (
    CROSS_FIT_BELOW,
    CROSS_FIT_FEATURES_BELOW,
    DEFAULT_FOLDS,
    DEFAULT_TIME_BUDGET,
    FEATURES,
    MIN_TILE,
    FitConfig,
)
from ..errors import FitInterrupted
from ..images.batching import DecodeOptions
from ..model import distributed
from ..model.budget import FitPlan
from ..model.train_config import LIKELIHOODS
from ..model.train_state import EpochStats
from ..pipeline import FitJob, FitWatch
from .options import decode_options, max_pixels_option
from .render import err, warn
from .settings import config_option

FIT_DEFAULTS = FitConfig()  # the CLI shows and uses the library's defaults; one place to change them


def _channels(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...]:
    """'32,64,128' -> (32, 64, 128); FitConfig checks the counts."""
    if value is None:
        return ()
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"a comma-separated list of whole numbers, e.g. 32,64,128; got {value!r}") from None


def _tile(ctx: click.Context, param: click.Parameter, value: str) -> int | None:
    """'auto' -> None (the automatic rule), else the tile side in file pixels (0: none)."""
    if value == "auto":
        return None
    try:
        side = int(value)
    except ValueError:
        side = -1
    if side != 0 and side < MIN_TILE:
        raise click.BadParameter(f"auto, 0 or a side of at least {MIN_TILE} px; got {value!r}")
    return side


@click.command()
@config_option
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("model.vae"),
    show_default=True,
    help="Model file to write.",
)
@click.option(
    "--features",
    type=click.Choice(FEATURES),
    default=FIT_DEFAULTS.features,
    show_default=True,
    help="What the VAE models: a pretrained backbone's features of each image (EfficientNet-Lite0, ImageNet), "
    "its pixels, or auto (pixels for images under 64 px a side, else the backbone).",
)
@click.option(
    "--image-size",
    type=click.IntRange(4, 1024),
    help="Square working side of the pixel model (implies --features pixels under auto); default: from the data.",
)
@click.option("--latent-dim", type=click.IntRange(1, 4096), default=FIT_DEFAULTS.latent_dim, show_default=True)
@click.option(
    "--hidden-channels",
    callback=_channels,
    help="Channels of each stride-2 convolution, e.g. 32,64,128. Default: from the working size "
    "(32,64 at 28 px; 16,32,64 at 48 px).",
)
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
@click.option(
    "--time-budget",
    type=click.FloatRange(0, min_open=True),
    help=f"Seconds for the whole fit (reading images, every model, calibration); each model stops at its share of "
    f"it. 'inf': no limit. Default: {DEFAULT_TIME_BUDGET:.0f}, or no limit with --epochs.",
)
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
    "GPUs; slower for small ones, see benchmarks/README.md). Scores are always float32.",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option(
    "--max-unreadable-fraction",
    type=click.FloatRange(0, 1),
    default=FIT_DEFAULTS.max_unreadable_fraction,
    show_default=True,
    help="Fail when more of the training files than this cannot be read.",
)
@click.option(
    "--resume/--no-resume", default=False, help="Continue from the checkpoint OUTPUT.ckpt of an interrupted run."
)
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
    f"{CROSS_FIT_BELOW} readable images ({CROSS_FIT_FEATURES_BELOW} over the backbone's features), else 1 (one "
    "model, --calibration-fraction held out).",
)
@click.option(
    "--tile",
    callback=_tile,
    default="auto",
    show_default=True,
    help="Tiles of the local statistic, in file pixels: auto (files of 4 working sizes or more, in tiles "
    "of max(2 working sizes, long side / 3)), 0 (no tiles), or a side N applied to every larger file.",
)
@click.option("-q", "--quiet/--no-quiet", default=False, help="No progress display.")
@max_pixels_option
@decode_options
def fit(
    inputs: tuple[Path, ...],
    output: Path,
    features: str,
    image_size: int | None,
    latent_dim: int,
    hidden_channels: tuple[int, ...],
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
    tile: int | None,
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
    config = FitConfig(
        features=features,
        image_size=image_size,
        latent_dim=latent_dim,
        hidden_channels=hidden_channels,
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
        tile=tile,
    )
    job = FitJob(tuple(inputs), output, config, resume, checkpoint_every)
    world = distributed.init(device) if distributed.launched() else distributed.World()
    try:
        _fit(job, quiet, world)
    finally:
        distributed.destroy()


def _fit(job: FitJob, quiet: bool, world: distributed.World) -> None:
    """`fit` after its options are checked: the library's fit under signal handlers and a progress
    display; what happened, on rank 0; the exit code."""
    main_rank = world.is_main
    with _StopOnSignal(announce=main_rank) as stop, _FitProgress(quiet or not main_rank) as progress:
        watch = FitWatch(
            on_epoch=progress.update,
            on_model=progress.new_model,
            on_plan=progress.plan,
            on_phase=progress.phase,
            on_warning=warn,
            should_stop=stop.requested,
            started=process.STARTED,  # the budget counts the whole command, torch's import included
        )
        try:
            run = pipeline.fit(job, watch, world)
        except FitInterrupted as exc:
            if main_rank:
                err.print(f"[yellow]interrupted[/]: {escape(str(exc))}")
            sys.exit(128 + (stop.signum or signal.SIGINT))
        except KeyboardInterrupt:
            err.print("[red]aborted[/]: no model file written; `fit --resume` continues from the last checkpoint")
            sys.exit(130)
    if stop.signum is not None:
        if main_rank:
            tr = run.detector.metadata_["training"]
            err.print(
                f"[yellow]interrupted[/] at epoch {tr['epochs_run']}: wrote the best model so far to "
                f"{escape(str(job.output))} (best epoch {tr['best_epoch']}); `fit --resume` with the same options "
                "continues training from the last checkpoint."
            )
        sys.exit(128 + stop.signum)
    if main_rank:
        err.print(f"[green]wrote[/] {escape(run.summary.removeprefix('wrote '))}", highlight=False)


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
        self.t0 = time.perf_counter()
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

    def plan(self, p: FitPlan) -> None:
        """Before training: what will run and how long the whole command should take."""
        if self.quiet:
            return
        models = f"{p.models} models" if p.models > 1 else "1 model"
        limit = "no time limit" if p.budget is None else f"the {p.budget:.0f} s budget"
        capped = (
            f"; {limit} should allow about {p.epochs} of them, and training stops at it (--time-budget to change it)"
            if p.capped
            else f", within {limit}"
        )
        err.print(
            f"plan: {models}, up to {p.default_epochs} epochs of {p.train_images:,} images, training at "
            f"{1 / p.speed.train:,.0f} images/s on this machine; expected {p.expected:,.0f} s for the whole fit "
            f"({p.spent:.1f} s of it already spent starting, reading images and describing their patches){capped}",
            highlight=False,
        )

    def phase(self, line: str) -> None:
        """A phase of the fit starts or ends: one line, with the seconds since the command started."""
        if not self.quiet:
            since = process.STARTED if process.STARTED is not None else self.t0
            err.print(f"{time.perf_counter() - since:6.1f} s  {line}", highlight=False)

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
