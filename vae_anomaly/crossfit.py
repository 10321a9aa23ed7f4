"""What `fit` does between its options and the trained models.

The training images and the unreadable-file policy; the plan of splits or
folds (which images train each model, which calibrate it); and training
the K models in turn, with checkpoints a `--resume` continues exactly.

    one split:   model 0 trains on 80%, the other 20% calibrate
    K folds:     model k trains on every fold but k, and scores fold k,
                 so every image becomes a calibration score
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .config import (
    CROSS_FIT_BELOW,
    CROSS_FIT_FEATURES_BELOW,
    DEFAULT_FOLDS,
    MIN_TRAINING_IMAGES,
    MIN_VALIDATION_IMAGES,
    FitConfig,
)
from .decision.calibration import calibration_needed
from .decision.rule import DecisionRule
from .errors import FitError, FitInterrupted, ModelFileError
from .images.batching import ImageBatch, read_images
from .images.decoding import WORKING_SIZE, Preprocessing, ReadError, infer_preprocessing
from .images.facts import ImageFacts
from .images.listing import find_images, real_path, require_images
from .model import artifact, backbone
from .model.budget import model_time
from .model.distributed import World
from .model.feature_vae import FeatureVAE
from .model.features import choose_features
from .model.inference import ImageInput, as_paths, as_uint8_images
from .model.train import TrainResult, train
from .model.train_state import EpochStats
from .model.vae import VAE, ModelConfig, VAEConfig, build_model
from .validation import check_float


@dataclass
class TrainingImages:
    """The decoded training set, and what was left out of it."""

    pixels: np.ndarray  # uint8 (N, C, H, W)
    prep: Preprocessing
    bits: np.ndarray | None  # PNG lengths, for the complexity-corrected score
    unreadable: list[ReadError]
    ignored: int
    # Each image's name, properties, format and duplicate fingerprints, for the checks (checks.py).
    facts: ImageFacts
    paths: list[str]
    files: list[Path] = field(default_factory=list)  # the files read, in order ([] for an array)
    features: str = "pixels"  # what the VAE models: "backbone" or "pixels" (feature_vae.choose_features)
    why: str = ""  # the rule's reason, in words


def read_training_images(data: ImageInput, cfg: FitConfig, warn: Callable[[str], None]) -> TrainingImages:
    """Decode the normal images, skipping unreadable ones up to `max_unreadable_fraction`."""
    if isinstance(data, np.ndarray):
        pixels = as_uint8_images(data)
        prep = Preprocessing(pixels.shape[1], pixels.shape[2])
        if cfg.image_size is not None and cfg.image_size != prep.size:
            raise FitError(f"image_size {cfg.image_size} given, but the array's images are {prep.size} px")
        kind, why = choose_features(cfg.features, prep.size, cfg.image_size is not None)
        source = (prep.size, prep.size, prep.channels == 3, "")
        measured = ImageBatch([], pixels, [], sources=[source] * len(pixels)).measured()
        names = [f"[{i}]" for i in range(len(pixels))]
        # A fresh fit's level is PNG_LEVEL, scores' default.
        return TrainingImages(pixels, prep, None, [], 0, ImageFacts.of([measured]), names, [], kind, why)
    listing = find_images(as_paths(data))
    native, _ = infer_preprocessing(require_images(listing), cfg.image_size, largest=1024)
    kind, why = choose_features(cfg.features, native.size, cfg.image_size is not None)
    if kind == "backbone":  # decoded once, at the backbone's input size
        prep = replace(native, size=backbone.SIZE)
    else:
        prep = replace(native, size=native.size if cfg.image_size is not None else min(native.size, WORKING_SIZE))
        # The network's shape at this working size, checked before a single image is decoded.
        VAEConfig(prep.channels, prep.size, cfg.latent_dim, cfg.hidden_channels, cfg.likelihood)
    batch = read_images(listing.files, prep, options=cfg.decode, bits=True, on_warning=warn)
    unreadable, total = batch.errors, len(listing.files)
    if unreadable:
        shown = "; ".join(f"{e.path}: {e.reason}" for e in unreadable[:10])
        more = f" (and {len(unreadable) - 10} more)" if len(unreadable) > 10 else ""
        warn(f"skipped {len(unreadable)} unreadable training image(s): {shown}{more}")
    if len(batch.pixels) == 0:
        raise FitError(f"none of the {total} training image files could be read; see the reasons above")
    if len(unreadable) / total > cfg.max_unreadable_fraction:
        raise FitError(
            f"{len(unreadable)} of {total} training images are unreadable, more than "
            f"--max-unreadable-fraction {cfg.max_unreadable_fraction:g}; fix or remove them, or raise the limit"
        )
    return TrainingImages(
        batch.pixels,
        prep,
        batch.bits,
        unreadable,
        listing.ignored,
        ImageFacts.of([batch]),
        batch.paths,
        [real_path(p) for p in batch.paths],
        kind,
        why,
    )


def _smaller(n: int, fraction: float) -> int:
    return min(n - 1, max(1, round(n * fraction)))


def split(n: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random (larger, smaller) split of range(n), the smaller part `fraction` of it (at least 1)."""
    order = rng.permutation(n)
    k = _smaller(n, fraction)
    return np.sort(order[k:]), np.sort(order[:k])


def _validates(n_fit: int, cfg: FitConfig) -> bool:
    """Whether a model's training images are enough to hold some out for early stopping."""
    return round(n_fit * cfg.validation_fraction) >= MIN_VALIDATION_IMAGES


def model_sizes(plans: Sequence[tuple[np.ndarray, np.ndarray]], cfg: FitConfig) -> list[tuple[int, int]]:
    """(training, validation) image counts of each model, as `train_models` will split them."""
    sizes = []
    for fit_idx, _ in plans:
        n = len(fit_idx)
        val = _smaller(n, cfg.validation_fraction) if _validates(n, cfg) else 0
        sizes.append((n - val, val))
    return sizes


def plan(
    n: int, cfg: FitConfig, rng: np.random.Generator, features: str = "pixels"
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(training, calibration) indices of each model: one split, or K folds below CROSS_FIT_BELOW images
    (CROSS_FIT_FEATURES_BELOW for a VAE over the backbone's features)."""
    if n < MIN_TRAINING_IMAGES:
        raise FitError(
            f"only {n} readable training image(s); at least {MIN_TRAINING_IMAGES} are needed to train "
            "and hold some out for calibration (a few hundred give useful p-values)"
        )
    below = CROSS_FIT_FEATURES_BELOW if features == "backbone" else CROSS_FIT_BELOW
    folds = cfg.folds if cfg.folds is not None else (DEFAULT_FOLDS if n < below else 1)
    if folds > 1 and n < 2 * folds:
        raise FitError(f"{folds} folds need at least {2 * folds} readable images, got {n}; lower --folds")
    if folds == 1:
        return [split(n, cfg.calibration_fraction, rng)]
    # Every image lands in exactly one fold; model k trains on the others.
    fold_of = np.empty(n, np.int64)
    fold_of[rng.permutation(n)] = np.arange(n) % folds
    return [(np.nonzero(fold_of != k)[0], np.nonzero(fold_of == k)[0]) for k in range(folds)]


def calibration_warning(n_calibration: int, folds: int) -> str | None:
    """What the default decision can do with these calibration images, where it cannot reach --fpr 0.01."""
    rule = DecisionRule()
    need = calibration_needed(rule.level)
    if n_calibration >= need:
        return None
    fix = "Add normal images." if folds > 1 else "Add normal images, raise --calibration-fraction, or --folds 5."
    return (
        f"only {n_calibration} calibration images: the default decision reaches "
        f"p <= {rule.level:g} from {need} on; with {n_calibration}, `score` flags at its smallest reachable level, "
        f"{rule.floor(n_calibration):.4g}, and says so (nothing, with --strict-fpr). {fix}"
    )


def noise_seed(cfg: FitConfig) -> int:
    """The seed of the scores' Monte Carlo draws, apart from training's streams, stored in the model file."""
    return cfg.seed + 1_000_003


def identity(pixels: np.ndarray, cfg: FitConfig) -> tuple[str, str, dict[str, Any]]:
    """The data's fingerprint, the run's identity (data and options: what a checkpoint belongs to), the settings."""
    data_fp = hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()[:16]
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("device", "decode")}
    ident = hashlib.sha256(json.dumps([data_fp, settings], sort_keys=True).encode()).hexdigest()
    return data_fp, ident, settings


def load_checkpoint(path: str | os.PathLike[str], ident: str, world: World) -> dict[str, Any]:
    """Rank 0 reads the checkpoint (only it writes them) and hands it on: other machines may not have the file."""
    if world.size == 1:
        return artifact.load_checkpoint(path, ident)
    state, error = None, None
    if world.is_main:
        try:
            state = artifact.load_checkpoint(path, ident)
        except ModelFileError as exc:
            error = str(exc)
    state, error = world.broadcast_object((state, error))
    if error is not None or state is None:
        raise ModelFileError(error or f"{os.fsdecode(path)}: rank 0 sent no checkpoint")
    return state


@dataclass
class Hooks:
    """How a caller watches and steers training: progress, stop requests, checkpoints."""

    on_epoch: Callable[[EpochStats], None] | None = None
    on_model: Callable[[int, int], None] | None = None
    should_stop: Callable[[], bool] | None = None
    checkpoint: str | os.PathLike[str] | None = None
    resume: bool = False
    checkpoint_every: float = 30.0
    on_warning: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        check_float("checkpoint_every", self.checkpoint_every, 0, math.inf, hi_open=True)


def train_models(
    pixels: np.ndarray,
    plans: Sequence[tuple[np.ndarray, np.ndarray]],
    cfg: FitConfig,
    vae_cfg: ModelConfig,
    device: torch.device,
    world: World,
    ident: str,
    hooks: Hooks,
    rng: np.random.Generator,
    schedule: tuple[int, float | None, float],
) -> tuple[list[VAE], list[TrainResult], list[tuple[int, int]]]:
    """Train one model per plan; returns the models, their results and (train, validation) sizes.

    `schedule` is (epochs per model, the budget's deadline in `time.perf_counter` seconds or None,
    seconds to keep for what follows training): each model stops at its share of the time left.
    """
    epochs, deadline, reserve = schedule
    t = torch.from_numpy(np.require(pixels, requirements=["W"]))
    ckpt = hooks.checkpoint
    saved = load_checkpoint(ckpt, ident, world) if hooks.resume and ckpt is not None else None
    done: list[dict[str, Any]] = list(saved["done"]) if saved else []
    models: list[VAE] = []
    results: list[TrainResult] = []
    sizes: list[tuple[int, int]] = []
    for k, (fit_idx, _) in enumerate(plans):
        if hooks.on_model is not None:
            hooks.on_model(k, len(plans))
        val_idx = np.array([], dtype=np.int64)
        if _validates(len(fit_idx), cfg):
            rel_train, rel_val = split(len(fit_idx), cfg.validation_fraction, rng)
            fit_idx, val_idx = fit_idx[rel_train], fit_idx[rel_val]
        torch.manual_seed(cfg.seed + k)
        model = build_model(vae_cfg)
        if isinstance(model, FeatureVAE):  # its whitening from the images it trains on, never its calibration fold
            model.fit_whitening(pixels[fit_idx])
        sizes.append((len(fit_idx), len(val_idx)))
        if k < len(done):  # finished before the interruption
            model.load_state_dict(done[k]["weights"])
            models.append(model.to(device).eval())
            results.append(TrainResult(**done[k]["result"]))
            continue

        def save_state(st: dict[str, Any], k: int = k) -> None:
            assert ckpt is not None
            artifact.save_checkpoint(ckpt, ident, {"done": done, "fold": k, "train": st})

        result = train(
            model,
            t[fit_idx],
            t[val_idx] if len(val_idx) else None,
            cfg.train_config(
                fold=k, epochs=epochs, time_budget=model_time(deadline, len(plans) - k, reserve), device=str(device)
            ),
            hooks.on_epoch,
            should_stop=hooks.should_stop,
            on_checkpoint=save_state if ckpt is not None and world.is_main else None,
            checkpoint_every=hooks.checkpoint_every,
            resume=saved["train"] if saved and saved["fold"] == k and k == len(done) else None,
            world=world,
        )
        results.append(result)
        models.append(model)
        if result.stopped == "interrupted" and len(plans) > 1:
            raise FitInterrupted(
                f"interrupted while training model {k + 1} of {len(plans)} (cross-fitting): no model file can be "
                "written until all are trained"
                + ("; `fit --resume` continues from the last checkpoint." if ckpt is not None else ".")
            )
        weights = {n: v.detach().cpu().clone() for n, v in model.state_dict().items()}
        done.append({"weights": weights, "result": result.to_dict()})
    finished = all(r.stopped != "interrupted" for r in results)  # an interrupted fit keeps its own checkpoint
    if ckpt is not None and world.is_main and finished and not (saved and len(saved["done"]) == len(plans)):
        # Every model trained: kept, so that a failed model-file write loses no training (`--resume`).
        try:
            artifact.save_checkpoint(ckpt, ident, {"done": done, "fold": len(plans), "train": None})
        except OSError as exc:
            if hooks.on_warning is not None:
                hooks.on_warning(f"could not keep the trained models in {os.fsdecode(ckpt)}: {exc.strerror or exc}")
    return models, results, sizes


def features_metadata(images: TrainingImages) -> dict[str, Any]:
    """What the VAE models and why (`info` shows it); for the backbone, its name and weights' hash."""
    out: dict[str, Any] = {"kind": images.features, "why": images.why}
    if images.features == "backbone":
        out.update(backbone=backbone.NAME, weights_sha256=backbone.WEIGHTS_SHA256, size=backbone.SIZE, dim=backbone.DIM)
    return out


def training_metadata(
    vae_cfg: ModelConfig,
    images: TrainingImages,
    cfg: FitConfig,
    trained: tuple[Sequence[tuple[np.ndarray, np.ndarray]], Sequence[TrainResult], Sequence[tuple[int, int]]],
    settings: dict[str, Any],
    data_fp: str,
    device: torch.device,
    world: World,
) -> dict[str, Any]:
    """What the model file says about how it was made (`vae-anomaly info` shows it).

    `trained` is the plans, the training results and the (train, validation) sizes of the K models.
    """
    plans, results, sizes = trained
    folds = len(plans)
    summaries = [{k: v for k, v in r.to_dict().items() if k != "history"} for r in results]
    overall = dict(summaries[0])
    overall["seconds"] = sum(r.seconds for r in results)
    return {
        "config": vae_cfg.to_dict(),
        "preprocessing": images.prep.to_dict(),
        "features": features_metadata(images),
        "noise_seed": noise_seed(cfg),
        "samples": dict(cfg.samples),
        "models": folds,
        "training": {
            "images": len(images.pixels),
            "train_images": sizes[0][0],
            "validation_images": sizes[0][1],
            "calibration_images": sum(len(c) for _, c in plans),
            "unreadable_images": len(images.unreadable),
            "ignored_files": images.ignored,
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
