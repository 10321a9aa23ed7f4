"""`fit`: train on normal images, write the model file, and say what was trained on what.

    run = fit(FitJob(inputs=(Path("normal_imgs"),), output=Path("model.vae")))
    print(run.summary)

Checkpoints, the model file's write and, under torchrun, rank 0's part live here; the CLI adds the
signals, the progress display and the exit code.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import FitConfig
from ..decision.rule import DecisionRule
from ..detector import Detector
from ..errors import ConfigError, OutputError
from ..model import artifact, distributed
from ..model.budget import FitPlan
from ..model.train_state import EpochStats
from ..reports.outputs import check_model_output
from ..validation import check_float


@dataclass(frozen=True)
class FitJob:
    """Everything `fit` was told: what to train on, where the model file goes, the model's options
    (`FitConfig`, what `Detector` takes), and the checkpoints."""

    inputs: tuple[Path, ...]
    output: Path = Path("model.vae")
    model: FitConfig = field(default_factory=FitConfig)
    resume: bool = False  # continue from `checkpoint`
    checkpoint_every: float = 30.0  # seconds between checkpoints, written at epoch ends

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("no inputs: give folders or image files of normal images to fit on")
        check_float("checkpoint_every", self.checkpoint_every, 0, math.inf, hi_open=True)

    @property
    def checkpoint(self) -> Path:
        """OUTPUT.ckpt: the resumable state of an unfinished fit."""
        return self.output.with_name(self.output.name + ".ckpt")


@dataclass(frozen=True)
class FitWatch:
    """How a caller watches and steers a fit; every hook optional. Under torchrun only rank 0's
    warnings, plan and phases are passed on."""

    on_epoch: Callable[[EpochStats], None] | None = None
    on_model: Callable[[int, int], None] | None = None  # (k, K) before each cross-fitted model
    on_plan: Callable[[FitPlan], None] | None = None
    on_phase: Callable[[str], None] | None = None
    on_warning: Callable[[str], None] | None = None
    should_stop: Callable[[], bool] | None = None  # asked after every step: stop and keep the best so far
    started: float | None = None  # when the command started (perf_counter): the budget counts from it


@dataclass
class FitRun:
    """What one fit produced."""

    detector: Detector
    output: Path
    seconds: float
    stopped: bool  # a stop was asked for: the best model so far was written, the checkpoint kept
    summary: str  # what was trained on what (`fit_summary`)


def fit(job: FitJob, watch: FitWatch | None = None, world: distributed.World | None = None) -> FitRun:
    """Train, write the model file (rank 0), wait for it on every rank, and drop the checkpoint of a
    finished fit. Raises FitInterrupted (nothing to write yet), OutputError (with how to write the
    model from its checkpoint) and the errors of `Detector.fit`."""
    watch = watch or FitWatch()
    world = world or distributed.current()
    main = world.is_main
    if main:
        check_model_output(job.output, list(job.inputs))  # never a training image, as `score` refuses its inputs
        artifact.check_writable(job.output)  # before the training, not after it
    t0 = time.perf_counter()
    detector = Detector(job.model).fit(
        list(job.inputs),
        on_epoch=watch.on_epoch,
        on_warning=watch.on_warning if main else None,
        should_stop=watch.should_stop,
        checkpoint=job.checkpoint,
        resume=job.resume,
        checkpoint_every=job.checkpoint_every,
        on_model=watch.on_model,
        on_plan=watch.on_plan if main else None,
        on_phase=watch.on_phase if main else None,
        started=watch.started,
    )
    seconds = time.perf_counter() - t0
    if main:
        _save(detector, job.output, job.checkpoint)
    world.barrier()  # every process of the job ends after rank 0's file is written
    stopped = watch.should_stop is not None and watch.should_stop()
    if main and not stopped:
        job.checkpoint.unlink(missing_ok=True)
    return FitRun(detector, job.output, seconds, stopped, fit_summary(detector, job.output, seconds, world))


def _save(detector: Detector, output: Path, checkpoint: Path) -> None:
    """Write the model file; where that fails, say how to write it from the checkpoint without training again."""
    try:
        detector.save(output)
    except OutputError as exc:
        kept = (
            f" The trained models are kept in {checkpoint}: free space and run the same command with --resume, "
            f"or move it to OTHER.vae.ckpt and run it with --resume -o OTHER.vae."
            if checkpoint.exists()
            else ""
        )
        raise OutputError(f"{exc}{kept}") from None


def fit_summary(detector: Detector, output: Path, seconds: float, world: distributed.World) -> str:
    """The line `fit` ends with: what was trained on what, the smallest reachable p-value, the fingerprint."""
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
    if world.size > 1:
        how += f"; trained by {world.size} processes"
    floor = detector.smallest_p_value(DecisionRule().score)
    return (
        f"wrote {os.fsdecode(output)}: {how}; smallest reachable p-value {floor:.4g}; {seconds:.1f} s; "
        f"fingerprint {detector.fingerprint}"
    )
