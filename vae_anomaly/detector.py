"""`Detector`: the Python API. Fit on normal images, score new ones, decide.

    det = Detector(FitConfig(epochs=20)).fit("normal_imgs/")
    result = det.score("incoming/")
    decision = det.decide(result, threshold="auto", fpr=0.01)
    det.save("model.vae")

Fitted state lives in attributes ending in `_` (PyOD's convention). Nothing
here imports click or rich.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, artifact
from .calibration import (
    BatchTest,
    Threshold,
    auto_threshold,
    calibration_needed,
    cross_conformal_p_values,
    fdr_threshold,
    flag,
    p_values,
    run_batch_tests,
    score_threshold,
    shift_sample,
    smallest_p_value,
)
from .distributed import World, current
from .images import (
    DecodeOptions,
    FileListing,
    ImageBatch,
    Preprocessing,
    ReadError,
    available_cpus,
    find_images,
    infer_preprocessing,
    iter_batches,
    read_images,
    require_images,
    unlike_warnings,
)
from .model import ConvVAE, VAEConfig
from .scores import SCORE_NAMES, SCORE_SPECS, kl_to_standard_normal, latent_noise, pixel_nll_map, score_batch
from .train import PRECISIONS, EpochStats, TrainConfig, TrainResult, train

MIN_TRAINING_IMAGES = 10
MIN_VALIDATION_IMAGES = 20  # below this, early stopping would chase noise
# Below this many readable normal images `fit` cross-fits by default. The
# default decision is two two-sided tests (score and kl guard) at 0.5% each,
# which needs 399 calibration scores to flag anything at 1%: a 20% split of
# 2000 images leaves 400. With fewer, a split wastes images that
# cross-fitting turns into calibration scores, at K times the training cost.
CROSS_FIT_BELOW = 2000
DEFAULT_FOLDS = 5

ImageInput = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | np.ndarray


DEFAULT_SCORE = "elbo-ic"  # measured best on one-class MNIST (benchmarks/one_class.py)
DEFAULT_GUARD = "kl"  # catches shrunk, noisy, dimmed, blurred frames (benchmarks/corruptions.py)


class FitError(Exception):
    """Fitting cannot proceed with these images or options; the message says why and what to do."""


class FitInterrupted(Exception):
    """Training was asked to stop before a usable model existed; the message says how to resume."""


class CalibrationError(Exception):
    """A decision was asked for that the model's calibration cannot support."""


@dataclass
class FitConfig:
    """Every option of `fit`; the CLI builds one of these and nothing else."""

    image_size: int | None = None  # None: from the data
    latent_dim: int = 16
    likelihood: str = "gaussian"
    hidden_channels: tuple[int, ...] = ()
    epochs: int | None = None  # None: 50, or enough for 600 steps on small data sets
    time_budget: float | None = None
    batch_size: int = 128
    learning_rate: float = 1e-3
    patience: int = 5
    calibration_fraction: float = 0.2  # of the normal images, never trained on
    validation_fraction: float = 0.1  # of the rest, for early stopping only
    seed: int = 0
    device: str = "auto"
    # Training arithmetic: "bf16" runs the forward pass under bf16 autocast. Measured on an H100
    # (benchmarks/gpu_check.py) this small network trains slower in bf16 (18,600 against
    # 23,600 images/s: its kernels are too small to gain), so float32 is the default.
    # Scoring is always float32.
    precision: str = "fp32"
    samples: dict[str, int] = field(default_factory=lambda: {k: s.default_samples for k, s in SCORE_SPECS.items()})
    max_unreadable_fraction: float = 0.1
    # Cross-fitting: K models, each trained on K-1 folds and scoring the fold it
    # did not see, so every image becomes a calibration score. None: 5 folds
    # below CROSS_FIT_BELOW readable images, else 1 (one split, one model).
    folds: int | None = None
    # Worker processes and the decoded-pixel cache: how fast files are read, never what the model learns.
    decode: DecodeOptions = field(default_factory=DecodeOptions)

    def __post_init__(self) -> None:
        if self.folds is not None and not 1 <= self.folds <= 20:
            raise ValueError(f"folds must be between 1 and 20, got {self.folds}")
        if not 0 < self.calibration_fraction < 1:
            raise ValueError(f"calibration_fraction must be in (0, 1), got {self.calibration_fraction}")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if not 0 <= self.max_unreadable_fraction <= 1:
            raise ValueError(f"max_unreadable_fraction must be in [0, 1], got {self.max_unreadable_fraction}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name, n in self.samples.items():
            if name not in SCORE_SPECS or n < 1:
                raise ValueError(f"samples: unknown score {name!r} or count {n} < 1")


@dataclass
class ScoreResult:
    """Scores of the readable images, in input order, and the unreadable ones."""

    paths: list[str]
    scores: np.ndarray  # float64 (N,)
    errors: list[ReadError]
    score: str
    samples: int
    ignored: int = 0  # hidden and non-image files skipped in folders
    # (K, N) scores under each of K cross-fitted models; `scores` is their mean.
    # None for a single model.
    model_scores: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)  # inputs unlike the training images
    # The guard statistic's scores of the same images (see Detector.score), or None.
    guard: ScoreResult | None = None
    # Inputs unlike the training images, converted anyway: kind -> (count, first example path).
    # `warnings` says the same in words; `vae-anomaly merge` adds up the shards' counts.
    unlike: dict[str, tuple[int, str]] = field(default_factory=dict)


@dataclass
class HeatMaps:
    """Per-pixel anomaly maps of the readable images, in input order.

    `maps[i]` is -log p(x|z) per pixel (summed over channels, in nats),
    averaged over the Monte Carlo draws; `maps[i].sum() + kl[i]` is the
    image's -ELBO. `images` and `reconstructions` are uint8 (N, C, H, W) at
    the model's input size, i.e. what the model saw and gave back.
    """

    paths: list[str]
    images: np.ndarray
    reconstructions: np.ndarray
    maps: np.ndarray  # float64 (N, H, W)
    kl: np.ndarray  # float64 (N,)
    errors: list[ReadError]


@dataclass
class Decision:
    """p-values and flags for a `ScoreResult` under one rule."""

    p_values: np.ndarray
    flags: np.ndarray
    threshold: Threshold
    n_calibration: int
    warnings: list[str]


class _ThreadShare:
    """Decoding workers beside scoring on the CPU: only where they pay, and with torch on the CPUs they leave.

    Two torch threads competing with a worker process for two cores run
    slower than one thread beside it (measured: 4,745 against 6,025 images/s
    for the default decision from 28x28 PNG files on 2 cores). And where
    scoring an image costs far more than decoding it, workers only take CPUs
    from torch. So the first batches are decoded and scored in this process,
    timed, and workers start only if decoding costs at least WORTH_IT times
    scoring (each the least over PROBE_BATCHES batches: the first ones also
    pay one-time costs).
    """

    # Measured on 2 cores: 28x28 grey PNGs, decoding 1.3-1.9x scoring, workers win
    # (6,755 against 4,200 images/s over 200,000 files); 64x64 colour, 1.0-1.4x, workers
    # lose a little (700-790 against 786-874). A heuristic: `--workers 0` or `--workers N`
    # overrides it.
    WORTH_IT = 1.2

    def __init__(self, device: torch.device) -> None:
        self.cpu = device.type == "cpu"
        # Scoring on the CPU keeps half the CPUs; on a GPU it needs one to feed it.
        self.reserve = max(1, available_cpus() // 2) if self.cpu else 1
        self._before: int | None = None
        self.score_seconds: float | None = None  # per image, first batch, all threads

    def observe(self, seconds: float, images: int) -> None:
        """The least scoring time per image seen (the first batch also pays one-time costs)."""
        if images:
            self.score_seconds = min(self.score_seconds or math.inf, seconds / images)

    def worth_it(self, decode_seconds: float) -> bool:
        if not self.cpu or self.score_seconds is None:
            return True
        return decode_seconds >= self.WORTH_IT * self.score_seconds

    def share(self, workers: int) -> None:
        if self.cpu:
            self._before = torch.get_num_threads()
            torch.set_num_threads(max(1, min(self._before, available_cpus() - workers)))

    def __enter__(self) -> _ThreadShare:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._before is not None:
            torch.set_num_threads(self._before)
            self._before = None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but torch sees no CUDA GPU here; use --device cpu")
    return torch.device(device)


def _training_device(device: str, world: World) -> torch.device:
    """The fit option's device; in a process group, the group's: one GPU per process under NCCL."""
    if world.size == 1:
        return resolve_device(device)
    if world.device.type == "cuda":
        if device == "cpu":
            raise ValueError("device cpu was asked for, but the process group uses NCCL (GPUs); use gloo for CPU")
        return world.device
    if device.startswith("cuda"):
        raise ValueError("device cuda was asked for, but the process group uses gloo (CPU); start it with NCCL")
    return torch.device("cpu")


def _load_checkpoint(path: str | os.PathLike[str], identity: str, world: World) -> dict[str, Any]:
    """Rank 0 reads the checkpoint (only it writes them) and hands it on: other machines may not have the file."""
    if world.size == 1:
        return artifact.load_checkpoint(path, identity)
    state, error = None, None
    if world.is_main:
        try:
            state = artifact.load_checkpoint(path, identity)
        except artifact.ModelFileError as exc:
            error = str(exc)
    state, error = world.broadcast_object((state, error))
    if error is not None:
        raise artifact.ModelFileError(error)
    return state


def _as_uint8_images(arr: np.ndarray) -> np.ndarray:
    """Accept (N, H, W) grey or (N, C, H, W) with C in {1, 3}; uint8 only."""
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (0-255), got {a.dtype}")
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4 or a.shape[1] not in (1, 3) or a.shape[2] != a.shape[3]:
        raise ValueError(f"images must be (N, H, W) or (N, C, H, W) square with C in (1, 3), got {a.shape}")
    return np.ascontiguousarray(a)


def _as_paths(data: ImageInput) -> list[str | os.PathLike[str]]:
    if isinstance(data, (str, os.PathLike)):
        return [data]
    return list(data)


def _fingerprint(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()[:16]


def _split(n: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    k = min(n - 1, max(1, round(n * fraction)))
    return np.sort(order[k:]), np.sort(order[:k])


class Detector:
    """A VAE anomaly detector: `fit` on normal images, then `score` and `decide`."""

    def __init__(self, config: FitConfig | None = None) -> None:
        self.config = config or FitConfig()
        self.model_: ConvVAE | None = None  # the (first) model; all K are in models_
        self.models_: list[ConvVAE] = []
        self.calibration_folds_: np.ndarray = np.zeros(0, np.int64)  # fold (= model) of each calibration score
        self.preprocessing_: Preprocessing | None = None
        self.calibration_: dict[str, np.ndarray] = {}
        self.metadata_: dict[str, Any] = {}
        self.checksum_: str | None = None
        self.device_ = torch.device("cpu")
        self.decode = self.config.decode  # how files are read when scoring, too

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        data: ImageInput,
        *,
        on_epoch: Callable[[EpochStats], None] | None = None,
        on_warning: Callable[[str], None] | None = None,
        on_model: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        resume: bool = False,
        checkpoint_every: float = 30.0,
    ) -> Detector:
        """Train on normal images (paths, folders, or a uint8 array) and calibrate.

        With folds K > 1 (the default below CROSS_FIT_BELOW images) this trains
        K models; `on_model(k, K)` is called before each.

        With `checkpoint`, a resumable state is written there during training;
        `resume=True` continues from it and ends with the same models as a run
        that was never interrupted. `should_stop` (asked after every step)
        ends training early: a single model keeps its best state so far; an
        unfinished cross-fit raises `FitInterrupted` (its checkpoint remains).

        In a process group (torchrun; see `distributed.py`) every process calls
        `fit` with the same data and options: each model is trained with
        DistributedDataParallel, each process on its slice of every batch;
        rank 0 alone writes and reads checkpoints; the calibration images are
        shared out and their scores summed, so every process ends with the
        same fitted detector, and the caller saves it on rank 0 only.
        """
        cfg = self.config
        world = current()
        warn = on_warning or (lambda _msg: None)
        unreadable: list[ReadError] = []
        if isinstance(data, np.ndarray):
            pixels = _as_uint8_images(data)
            prep = Preprocessing(pixels.shape[1], pixels.shape[2])
            if cfg.image_size is not None and cfg.image_size != prep.size:
                raise FitError(f"image_size {cfg.image_size} given, but the array's images are {prep.size} px")
            ignored, bits = 0, None
        else:
            listing = find_images(_as_paths(data))
            prep, _ = infer_preprocessing(require_images(listing), cfg.image_size)
            batch = read_images(listing.files, prep, options=cfg.decode, bits=True, on_warning=warn)
            pixels, unreadable, ignored, bits = batch.pixels, batch.errors, listing.ignored, batch.bits
            if unreadable:
                shown = "; ".join(f"{e.path}: {e.reason}" for e in unreadable[:10])
                more = f" (and {len(unreadable) - 10} more)" if len(unreadable) > 10 else ""
                warn(f"skipped {len(unreadable)} unreadable training image(s): {shown}{more}")
            total = len(listing.files)
            if len(pixels) == 0:
                raise FitError(f"none of the {total} training image files could be read; see the reasons above")
            if len(unreadable) / total > cfg.max_unreadable_fraction:
                raise FitError(
                    f"{len(unreadable)} of {total} training images are unreadable, more than "
                    f"--max-unreadable-fraction {cfg.max_unreadable_fraction:g}; fix or remove them, "
                    "or raise the limit"
                )
        n = len(pixels)
        if n < MIN_TRAINING_IMAGES:
            raise FitError(
                f"only {n} readable training image(s); at least {MIN_TRAINING_IMAGES} are needed to train "
                "and hold some out for calibration (a few hundred give useful p-values)"
            )
        folds = cfg.folds if cfg.folds is not None else (DEFAULT_FOLDS if n < CROSS_FIT_BELOW else 1)
        if folds > 1 and n < 2 * folds:
            raise FitError(f"{folds} folds need at least {2 * folds} readable images, got {n}; lower --folds")
        rng = np.random.default_rng(cfg.seed)
        if folds == 1:
            fit_idx, cal_idx = _split(n, cfg.calibration_fraction, rng)
            plans = [(fit_idx, cal_idx)]
        else:
            # Every image lands in exactly one fold; model k trains on the others.
            fold_of = np.empty(n, np.int64)
            fold_of[rng.permutation(n)] = np.arange(n) % folds
            plans = [(np.nonzero(fold_of != k)[0], np.nonzero(fold_of == k)[0]) for k in range(folds)]
        n_cal = sum(len(c) for _, c in plans)
        # The same arithmetic as `decide`, for the default decision (two-sided, guarded) and
        # for a plain one-sided test: warn about the strictest one these images cannot run.
        checks = [("the default decision (two-sided, with the kl guard)", calibration_needed(0.01 / 2, "two-sided"))]
        checks.append(("even a one-sided test", calibration_needed(0.01, "upper")))
        failing = [(what, need) for what, need in checks if n_cal < need]
        if failing:
            what, need = failing[-1]
            fix = (
                "Add normal images."
                if folds > 1
                else "Add normal images, raise --calibration-fraction, or cross-fit with --folds 5."
            )
            warn(
                f"only {n_cal} calibration images: {what} at --fpr 0.01 needs at least {need}; with fewer, "
                f"nothing can be flagged at that rate. {fix}"
            )

        device = _training_device(cfg.device, world)
        vae_cfg = VAEConfig(prep.channels, prep.size, cfg.latent_dim, cfg.hidden_channels, cfg.likelihood)
        t = torch.from_numpy(np.require(pixels, requirements=["W"]))
        data_fp = _fingerprint(pixels)
        settings = {k: v for k, v in asdict(cfg).items() if k not in ("device", "decode")}
        identity = hashlib.sha256(json.dumps([data_fp, settings], sort_keys=True).encode()).hexdigest()
        saved = _load_checkpoint(checkpoint, identity, world) if resume and checkpoint is not None else None
        done: list[dict[str, Any]] = list(saved["done"]) if saved else []
        models: list[ConvVAE] = []
        results: list[TrainResult] = []
        sizes: list[tuple[int, int]] = []
        for k, (fit_idx, _) in enumerate(plans):
            if on_model is not None:
                on_model(k, folds)
            val_idx = np.array([], dtype=np.int64)
            if round(len(fit_idx) * cfg.validation_fraction) >= MIN_VALIDATION_IMAGES:
                rel_train, rel_val = _split(len(fit_idx), cfg.validation_fraction, rng)
                fit_idx, val_idx = fit_idx[rel_train], fit_idx[rel_val]
            torch.manual_seed(cfg.seed + k)
            model = ConvVAE(vae_cfg)
            sizes.append((len(fit_idx), len(val_idx)))
            if k < len(done):  # finished before the interruption
                model.load_state_dict(done[k]["weights"])
                models.append(model.to(device).eval())
                results.append(TrainResult(**done[k]["result"]))
                continue
            tcfg = TrainConfig(
                epochs=cfg.epochs,
                # A time budget is for the whole fit, so K models share it.
                time_budget=None if cfg.time_budget is None else cfg.time_budget / folds,
                batch_size=cfg.batch_size,
                learning_rate=cfg.learning_rate,
                patience=cfg.patience,
                seed=cfg.seed + k,
                device=str(device),
                precision=cfg.precision,
            )

            def save_state(st: dict[str, Any], k: int = k) -> None:
                artifact.save_checkpoint(checkpoint, identity, {"done": done, "fold": k, "train": st})

            result = train(
                model,
                t[fit_idx],
                t[val_idx] if len(val_idx) else None,
                tcfg,
                on_epoch,
                should_stop=should_stop,
                on_checkpoint=save_state if checkpoint is not None and world.is_main else None,
                checkpoint_every=checkpoint_every,
                resume=saved["train"] if saved and saved["fold"] == k and k == len(done) else None,
                world=world,
            )
            results.append(result)
            models.append(model)
            if result.stopped == "interrupted" and folds > 1:
                raise FitInterrupted(
                    f"interrupted while training model {k + 1} of {folds} (cross-fitting): no model file can be "
                    "written until all are trained"
                    + ("; `fit --resume` continues from the last checkpoint." if checkpoint is not None else ".")
                )
            done.append(
                {
                    "weights": {n: v.detach().cpu().clone() for n, v in model.state_dict().items()},
                    "result": result.to_dict(),
                }
            )
        self.models_, self.preprocessing_, self.device_ = models, prep, device
        self.model_ = models[0]

        noise_seed = cfg.seed + 1_000_003
        summaries = [{k: v for k, v in r.to_dict().items() if k != "history"} for r in results]
        overall = dict(summaries[0])
        overall["seconds"] = sum(r.seconds for r in results)
        self.metadata_ = {
            "config": vae_cfg.to_dict(),
            "preprocessing": prep.to_dict(),
            "noise_seed": noise_seed,
            "samples": dict(cfg.samples),
            "models": folds,
            "training": {
                "images": n,
                "train_images": sizes[0][0],
                "validation_images": sizes[0][1],
                "calibration_images": n_cal,
                "unreadable_images": len(unreadable),
                "ignored_files": ignored,
                "data_fingerprint": data_fp,
                "seed": cfg.seed,
                "device": str(device),
                "precision": cfg.precision,
                "processes": world.size,
                "folds": folds,
                "cross_fit": folds > 1,
                "fit_config": {k: v for k, v in settings.items() if k != "samples"},
                **overall,
                "per_model": summaries if folds > 1 else [],
            },
            "versions": {
                "vae_anomaly": __version__,
                "torch": torch.__version__,
                "numpy": np.__version__,
                "python": platform.python_version(),
            },
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self.calibration_folds_ = np.concatenate([np.full(len(c), k, np.int64) for k, (_, c) in enumerate(plans)])
        self.calibration_ = self._calibrate(pixels, [c for _, c in plans], cfg.samples, world, bits)
        self.checksum_ = None
        return self

    def _calibrate(
        self,
        pixels: np.ndarray,
        folds: list[np.ndarray],
        samples: Mapping[str, int],
        world: World,
        bits: np.ndarray | None = None,
        batch_size: int = 512,
    ) -> dict[str, np.ndarray]:
        """Every score type of every calibration image, by the model that did not train on it.

        All score types of a batch come from one encoder pass (`score_batch`).
        Several processes take every W-th batch, leave zeros elsewhere, and sum:
        exact (x + 0 = x), and each batch is the one a single process scores.
        """
        offsets = np.cumsum([0] + [len(c) for c in folds])
        out = {name: np.zeros(offsets[-1]) for name in SCORE_NAMES}
        noise = {name: self._noise(samples[name]) for name in SCORE_NAMES}
        task = 0
        for k, idx in enumerate(folds):
            for i in range(0, len(idx), batch_size):
                if task % world.size == world.rank:
                    rows = idx[i : i + batch_size]
                    x = self._to_device(pixels[rows])
                    scores = self._score_pixels(x, noise, self.models_[k], None if bits is None else bits[rows])
                    for name in SCORE_NAMES:
                        out[name][offsets[k] + i : offsets[k] + i + len(rows)] = scores[name]
                task += 1
        if world.size > 1:
            summed = world.all_reduce_sum(torch.from_numpy(np.concatenate([out[n] for n in SCORE_NAMES]))).numpy()
            out = dict(zip(SCORE_NAMES, np.split(summed, len(SCORE_NAMES)), strict=True))
        return out

    # ---------------------------------------------------------------- score
    def _check_fitted(self) -> tuple[ConvVAE, Preprocessing]:
        if self.model_ is None or self.preprocessing_ is None:
            raise RuntimeError("this Detector is not fitted: call fit() or Detector.load() first")
        return self.model_, self.preprocessing_

    def default_samples(self, score: str) -> int:
        return int(self.metadata_.get("samples", {}).get(score, SCORE_SPECS[score].default_samples))

    def _noise(self, samples: int) -> torch.Tensor:
        model, _ = self._check_fitted()
        return latent_noise(model.config.latent_dim, samples, int(self.metadata_["noise_seed"]))

    @property
    def n_models(self) -> int:
        """K: 1 for a single model, K > 1 for cross-fitted models."""
        return max(1, len(self.models_))

    def _to_device(self, pixels: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.require(pixels, requirements=["W"]))
        if self.device_.type == "cuda":
            t = t.pin_memory()  # page-locked, so the copy to the GPU runs asynchronously
        return t.to(self.device_, non_blocking=True).float().div_(255.0)

    def _score_pixels(
        self, x: torch.Tensor, noise: Mapping[str, torch.Tensor], model: ConvVAE, bits: np.ndarray | None
    ) -> dict[str, np.ndarray]:
        b = None if bits is None else torch.from_numpy(np.asarray(bits, dtype=np.float64))
        return {k: v.double().cpu().numpy() for k, v in score_batch(model, x, noise, b).items()}

    def _batches(
        self,
        data: ImageInput | FileListing,
        batch_size: int,
        bits: bool = False,
        on_warning: Callable[[str], None] | None = None,
        threads: _ThreadShare | None = None,
    ) -> tuple[Iterator[ImageBatch], int]:
        _, prep = self._check_fitted()
        if isinstance(data, np.ndarray):
            pixels = _as_uint8_images(data)
            if pixels.shape[1:] != (prep.channels, prep.size, prep.size):
                raise ValueError(
                    f"array images are {pixels.shape[1:]}, the model expects "
                    f"{(prep.channels, prep.size, prep.size)}; pass files to have them converted"
                )
            it = (
                ImageBatch([f"[{i + j}]" for j in range(len(chunk))], chunk, [])
                for i in range(0, len(pixels), batch_size)
                for chunk in [pixels[i : i + batch_size]]
            )
            return it, 0
        if isinstance(data, FileListing):
            # Already listed by the caller, e.g. one shard of a listing (`score --shard`): scored as
            # given, even when empty, since a small folder can leave a shard without files.
            listing, files = data, data.files
        else:
            listing = find_images(_as_paths(data))
            files = require_images(listing)
        batches = iter_batches(
            files,
            prep,
            batch_size,
            options=self.decode,
            bits=bits,
            on_warning=on_warning,
            reserve=threads.reserve if threads is not None else 0,
            on_workers=threads.share if threads is not None else None,
            # An explicit --workers N is obeyed; only the default asks whether workers pay.
            worth_it=threads.worth_it if threads is not None and self.decode.workers is None else None,
        )
        return batches, listing.ignored

    def score(
        self,
        data: ImageInput | FileListing,
        *,
        score: str = DEFAULT_SCORE,
        samples: int | None = None,
        batch_size: int = 256,
        on_batch: Callable[[int, int], None] | None = None,
        guard: str | None = DEFAULT_GUARD,
        on_warning: Callable[[str], None] | None = None,
    ) -> ScoreResult:
        """Score images (higher = more anomalous); unreadable files become error records.

        `guard` names a second statistic scored alongside (default: the latent
        KL). `decide` then combines the two-sided p-values of both by
        Bonferroni, p = min(1, 2 min(p_score, p_guard)): the guard catches
        inputs whose pixels the decoder explains but whose latent code no
        normal image has (shrunk, noisy, dimmed or blurred frames). None, or
        the score itself, turns it off.
        """
        names = (score,) if guard in (None, score) else (score, guard)
        # `samples` is for the score; the guard keeps the count it was calibrated with.
        counts = {score: samples} if samples is not None else None
        out = self.score_many(
            data, scores=names, samples=counts, batch_size=batch_size, on_batch=on_batch, on_warning=on_warning
        )
        result = out[score]
        if len(names) == 2:
            result.guard = out[names[1]]
        return result

    def score_many(
        self,
        data: ImageInput | FileListing,
        *,
        scores: Sequence[str] = SCORE_NAMES,
        samples: int | Mapping[str, int] | None = None,
        batch_size: int = 256,
        on_batch: Callable[[int, int], None] | None = None,
        on_warning: Callable[[str], None] | None = None,
    ) -> dict[str, ScoreResult]:
        """Several score types in one pass, so each file is decoded once (`evaluate` asks for all).

        With K cross-fitted models every image is scored by each; `scores` is
        their mean and `model_scores` keeps all K for cross-conformal p-values.
        """
        for name in scores:
            if name not in SCORE_SPECS:
                raise ValueError(f"unknown score {name!r}; choose one of {', '.join(SCORE_NAMES)}")
        given = samples if isinstance(samples, Mapping) else dict.fromkeys(scores, samples)
        counts = {name: given.get(name) or self.default_samples(name) for name in scores}
        noise = {name: self._noise(n) for name, n in counts.items()}
        threads = _ThreadShare(self.device_)
        batches, ignored = self._batches(data, batch_size, "elbo-ic" in scores, on_warning, threads)
        paths: list[str] = []
        parts: dict[str, list[np.ndarray]] = {name: [] for name in scores}
        errors: list[ReadError] = []
        unlike: dict[str, tuple[int, str]] = {}
        with threads:
            for batch in batches:
                for kind, (count, example) in batch.unlike.items():
                    unlike[kind] = (unlike.get(kind, (0, example))[0] + count, unlike.get(kind, (0, example))[1])
                if len(batch.pixels):
                    t0 = time.perf_counter()
                    x = self._to_device(batch.pixels)
                    per_model = [self._score_pixels(x, noise, m, batch.bits) for m in self.models_]
                    for name in scores:
                        parts[name].append(np.stack([s[name] for s in per_model]))
                    threads.observe(time.perf_counter() - t0, len(batch.pixels))
                paths += batch.paths
                errors += batch.errors
                if on_batch is not None:
                    on_batch(len(batch.paths), len(batch.errors))
        warnings = unlike_warnings(unlike)
        out: dict[str, ScoreResult] = {}
        for name in scores:
            per_model = np.concatenate(parts[name], axis=1) if parts[name] else np.zeros((self.n_models, 0))
            out[name] = ScoreResult(
                list(paths),
                per_model.mean(axis=0) if self.n_models > 1 else per_model[0],
                list(errors),
                name,
                counts[name],
                ignored,
                model_scores=per_model if self.n_models > 1 else None,
                warnings=list(warnings),
                unlike=dict(unlike),
            )
        return out

    def heatmap(
        self, data: ImageInput, *, score: str = "elbo", samples: int | None = None, batch_size: int = 256
    ) -> HeatMaps:
        """Where in each image the decoder was surprised: per-pixel -log p(x|z), averaged over z.

        The draws are the score's own (same seed and count), so for `elbo` a
        map's sum is exactly the reconstruction term of the image's score
        (score = map.sum() + KL). Unreadable files are listed in `errors`.
        """
        model, _ = self._check_fitted()
        if score not in SCORE_SPECS:
            raise ValueError(f"unknown score {score!r}; choose one of {', '.join(SCORE_NAMES)}")
        eps = self._noise(samples or self.default_samples(score))
        batches, _ = self._batches(data, batch_size)
        paths: list[str] = []
        images, maps, recons, kls = [], [], [], []
        errors: list[ReadError] = []
        for batch in batches:
            paths += batch.paths
            errors += batch.errors
            if not len(batch.pixels):
                continue
            x = torch.from_numpy(batch.pixels).to(self.device_).float().div_(255.0)
            with torch.no_grad():
                m, r = pixel_nll_map(model, x, eps)  # (B, C, H, W) each
                mu, logvar = model.encode(x)
                kls.append(kl_to_standard_normal(mu, logvar).double().cpu().numpy())
            images.append(batch.pixels)
            maps.append(m.sum(1).double().cpu().numpy())
            recons.append(r.clamp(0, 1).mul(255).round().byte().cpu().numpy())
        _, prep = self._check_fitted()
        empty = np.zeros((0, prep.channels, prep.size, prep.size), np.uint8)
        return HeatMaps(
            paths,
            np.concatenate(images) if images else empty,
            np.concatenate(recons) if recons else empty,
            np.concatenate(maps) if maps else np.zeros((0, prep.size, prep.size)),
            np.concatenate(kls) if kls else np.zeros(0),
            errors,
        )

    def decide(
        self,
        result: ScoreResult,
        *,
        threshold: str | float = "auto",
        fpr: float = 0.01,
        tail: str = "two-sided",
        fdr: float | None = None,
    ) -> Decision:
        """Conformal p-values against the calibration scores, and flags under the rule.

        threshold "auto" flags p <= fpr, or, with `fdr` = q, runs Benjamini-Hochberg
        at level q over the batch. Cross-fitted models give cross-conformal p-values.
        """
        cal = self.calibration_.get(result.score)
        for name in [result.score] + ([result.guard.score] if result.guard is not None else []):
            if len(self.calibration_.get(name, [])) == 0:
                raise CalibrationError(
                    f"the model holds no calibration scores for {name!r} (written by an older vae-anomaly?): "
                    f"re-fit it, or score with one of {', '.join(sorted(self.calibration_))} and --guard none"
                )
        calibrated = self.default_samples(result.score)
        warnings: list[str] = []
        if result.samples != calibrated:
            if threshold == "auto":
                raise CalibrationError(
                    f"the model was calibrated with {calibrated} sample(s) for {result.score!r}, but "
                    f"{result.samples} were asked for; p-values need the same count. Drop --samples, or "
                    "pass a numeric --threshold"
                )
            warnings.append(
                f"p-values are approximate: calibrated with {calibrated} samples, scored with {result.samples}"
            )
        p = self.p_values(result, tail)
        tests = 2 if result.guard is not None else 1
        if threshold == "auto":
            level = fpr if fdr is None else fdr
            if fdr is None:
                # Score bounds of the main test at its Bonferroni share of the level.
                rule = replace(auto_threshold(cal, fpr / tests, tail), alpha=fpr, p_cutoff=fpr)
            else:
                guard = None if result.guard is None else result.guard.score
                rule = fdr_threshold(cal, p, fdr, tail, models=self.n_models, guard=guard)
            if self.n_models > 1:
                rule = replace(rule, low=None, high=None, models=self.n_models)
            if result.guard is not None:
                rule = replace(rule, guard=result.guard.score)
            need = calibration_needed(level / tests, tail)
            if len(cal) < need:
                refit = (
                    "Add normal images and re-fit"
                    if self.n_models > 1
                    else ("Re-fit with more normal images, a larger --calibration-fraction or --folds 5")
                )
                warnings.append(
                    f"{len(cal)} calibration scores cannot reach p <= {level:g} ({tail}); at least {need} are "
                    f"needed, so nothing will be flagged. {refit}, or raise --{'fpr' if fdr is None else 'fdr'}."
                )
        else:
            rule = score_threshold(float(threshold))
        return Decision(p, flag(result.scores, p, rule), rule, len(cal), warnings)

    def p_values(self, result: ScoreResult, tail: str = "two-sided") -> np.ndarray:
        """Conformal p-values (cross-conformal for K cross-fitted models) of a scored batch.

        With a guard statistic, the Bonferroni combination of both tests,
        p = min(1, 2 min(p_score, p_guard)): a valid p-value whatever the
        dependence between the two statistics.
        """
        if result.guard is not None:
            main = replace(result, guard=None)
            return np.minimum(1.0, 2.0 * np.minimum(self.p_values(main, tail), self.p_values(result.guard, tail)))
        cal = self.calibration_[result.score]
        if len(result.scores) == 0:
            return np.zeros(0)
        if self.n_models == 1:
            return p_values(cal, result.scores, tail)
        if result.model_scores is None:
            raise ValueError("cross-fitted models need each model's scores: score with this Detector")
        return cross_conformal_p_values(cal, self.calibration_folds_, result.model_scores, tail)

    def shift_inputs(self, result: ScoreResult) -> tuple[np.ndarray, np.ndarray]:
        """Batch and reference scores on one scale, for the Mann-Whitney shift test.

        A single model: the batch's scores and the calibration scores. K
        cross-fitted models: calibration score i comes from the model of its
        fold, so batch image j is scored by model j mod K; both samples then
        mix the K models' out-of-sample scores in (nearly) equal shares.
        """
        model_scores = result.model_scores if self.n_models > 1 else None
        return shift_sample(result.scores, model_scores), self.calibration_[result.score]

    def batch_tests(
        self,
        result: ScoreResult,
        decision: Decision,
        *,
        fpr: float = 0.01,
        tail: str = "two-sided",
        baseline: np.ndarray | None = None,
    ) -> dict[str, BatchTest]:
        """Batch-level tests, each a one-sided p-value (small = the batch looks worse than normal).

        shift:    Mann-Whitney U, batch scores above the calibration scores?
        binomial: more images at p <= fpr than a normal batch gives?
        drift:    Mann-Whitney U, batch scores above `baseline` (a previous batch's scores)?
        """
        return run_batch_tests(
            result.scores,
            decision.p_values,
            self.calibration_[result.score],
            fpr=fpr,
            tail=tail,
            model_scores=result.model_scores if self.n_models > 1 else None,
            baseline=baseline,
        )

    def smallest_p_value(self, score: str, tail: str = "two-sided", guard: str | None = None) -> float:
        """The smallest p-value this model can give: 1/(n+1), 2/(n+1) two-sided, n calibration scores;
        twice that when a guard statistic is combined by Bonferroni."""
        tests = 2 if guard not in (None, score) else 1
        return min(1.0, tests * smallest_p_value(len(self.calibration_[score]), tail))

    # ------------------------------------------------------------ save/load
    @property
    def fingerprint(self) -> str | None:
        return self.checksum_[:16] if self.checksum_ else None

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the model file atomically; returns its checksum (the model's fingerprint)."""
        self._check_fitted()
        cal = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in self.calibration_.items()}
        folds = self.calibration_folds_
        if len(folds) != len(next(iter(self.calibration_.values()))):
            folds = np.zeros(len(next(iter(self.calibration_.values()))), np.int64)
        cal[artifact.FOLD_KEY] = torch.from_numpy(np.asarray(folds, dtype=np.int64))
        state = {
            f"{artifact.model_prefix(k)}{name}": t
            for k, m in enumerate(self.models_)
            for name, t in m.state_dict().items()
        }
        self.metadata_["models"] = self.n_models
        self.checksum_ = artifact.save(path, self.metadata_, state, cal)
        return self.checksum_

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "auto", decode: DecodeOptions | None = None) -> Detector:
        """Rebuild config, then module, then weights; every failure is a `ModelFileError`.

        `decode` says how files will be read when scoring (workers, pixel cache).
        """
        mf = artifact.load(path)
        name = os.fsdecode(Path(path))
        try:
            meta = mf.metadata
            vae_cfg = VAEConfig.from_dict(meta["config"])
            prep = Preprocessing.from_dict(meta["preprocessing"])
            int(meta["noise_seed"])
            models = []
            for state in artifact.split_models(mf):
                model = ConvVAE(vae_cfg)
                model.load_state_dict(state, strict=True)
                models.append(model)
            cal = {k: v.double().numpy() for k, v in mf.calibration.items() if k != artifact.FOLD_KEY}
            n_cal = len(next(iter(cal.values())))
            fold_t = mf.calibration.get(artifact.FOLD_KEY)
            folds = np.zeros(n_cal, np.int64) if fold_t is None else fold_t.long().numpy()
            if len(folds) != n_cal or (len(folds) and int(folds.max()) >= len(models)):
                raise ValueError(f"{len(folds)} fold labels for {n_cal} calibration scores and {len(models)} models")
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise artifact.ModelFileError(
                f"{name}: the weights or settings inside do not fit together ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}). The file is damaged or was edited; re-train it."
            ) from None
        det = cls(FitConfig(decode=decode or DecodeOptions()))
        det.device_ = resolve_device(device)
        det.models_ = [m.to(det.device_).eval() for m in models]
        det.model_ = det.models_[0]
        det.preprocessing_ = prep
        det.metadata_ = meta
        det.calibration_ = cal
        det.calibration_folds_ = folds
        det.checksum_ = mf.checksum
        return det

    def info(self) -> dict[str, Any]:
        """What the model was trained on and how, for `vae-anomaly info`."""
        self._check_fitted()
        return {
            "fingerprint": self.fingerprint,
            **self.metadata_,
            "models": self.n_models,
            "calibration": {
                k: {"n": len(v), "samples": self.default_samples(k), "median": float(np.median(v)) if len(v) else None}
                for k, v in self.calibration_.items()
            },
        }
