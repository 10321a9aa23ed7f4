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
import os
import platform
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, artifact
from .calibration import Threshold, auto_threshold, calibration_needed, flag, p_values, score_threshold
from .images import (
    FileListing,
    ImageBatch,
    InputPathError,
    Preprocessing,
    ReadError,
    find_images,
    infer_preprocessing,
    iter_batches,
    read_images,
)
from .model import ConvVAE, VAEConfig
from .scores import SCORE_NAMES, SCORE_SPECS, kl_to_standard_normal, latent_noise, pixel_nll_map, score_images
from .train import EpochStats, TrainConfig, TrainResult, train

MIN_TRAINING_IMAGES = 10
MIN_VALIDATION_IMAGES = 20  # below this, early stopping would chase noise

ImageInput = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | np.ndarray


class FitError(Exception):
    """Fitting cannot proceed with these images or options; the message says why and what to do."""


class CalibrationError(Exception):
    """A decision was asked for that the model's calibration cannot support."""


@dataclass
class FitConfig:
    """Every option of `fit`; the CLI builds one of these and nothing else."""

    image_size: int | None = None  # None: from the data
    latent_dim: int = 16
    likelihood: str = "gaussian"
    hidden_channels: tuple[int, ...] = ()
    epochs: int | None = None  # None: 30, or enough for 600 steps on small data sets
    time_budget: float | None = None
    batch_size: int = 128
    learning_rate: float = 1e-3
    patience: int = 5
    calibration_fraction: float = 0.2  # of the normal images, never trained on
    validation_fraction: float = 0.1  # of the rest, for early stopping only
    seed: int = 0
    device: str = "auto"
    samples: dict[str, int] = field(default_factory=lambda: {k: s.default_samples for k, s in SCORE_SPECS.items()})
    max_unreadable_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.calibration_fraction < 1:
            raise ValueError(f"calibration_fraction must be in (0, 1), got {self.calibration_fraction}")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if not 0 <= self.max_unreadable_fraction <= 1:
            raise ValueError(f"max_unreadable_fraction must be in [0, 1], got {self.max_unreadable_fraction}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
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
    warnings: list[str] = field(default_factory=list)  # inputs unlike the training images


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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but torch sees no CUDA GPU here; use --device cpu")
    return torch.device(device)


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
        self.model_: ConvVAE | None = None
        self.preprocessing_: Preprocessing | None = None
        self.calibration_: dict[str, np.ndarray] = {}
        self.metadata_: dict[str, Any] = {}
        self.checksum_: str | None = None
        self.device_ = torch.device("cpu")

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        data: ImageInput,
        *,
        on_epoch: Callable[[EpochStats], None] | None = None,
        on_warning: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        resume: bool = False,
        checkpoint_every: float = 30.0,
    ) -> Detector:
        """Train on normal images (paths, folders, or a uint8 array) and calibrate.

        With `checkpoint`, a resumable state is written there during training;
        `resume=True` continues from it, and ends with the same model as a run
        that was never interrupted. `should_stop` (asked after every step)
        ends training early with the best state so far.
        """
        cfg = self.config
        warn = on_warning or (lambda _msg: None)
        unreadable: list[ReadError] = []
        if isinstance(data, np.ndarray):
            pixels = _as_uint8_images(data)
            prep = Preprocessing(pixels.shape[1], pixels.shape[2])
            if cfg.image_size is not None and cfg.image_size != prep.size:
                raise FitError(f"image_size {cfg.image_size} given, but the array's images are {prep.size} px")
            ignored = 0
        else:
            listing = find_images(_as_paths(data))
            if not listing.files:
                raise InputPathError(
                    "no image files found in the inputs "
                    f"({listing.ignored} hidden or non-image files ignored); "
                    "supported: PNG, JPEG, BMP, GIF, TIFF, WebP"
                )
            prep, _ = infer_preprocessing(listing.files, cfg.image_size)
            batch = read_images(listing.files, prep)
            pixels, unreadable, ignored = batch.pixels, batch.errors, listing.ignored
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
        rng = np.random.default_rng(cfg.seed)
        fit_idx, cal_idx = _split(n, cfg.calibration_fraction, rng)
        val_idx = np.array([], dtype=np.int64)
        n_val = round(len(fit_idx) * cfg.validation_fraction)
        if n_val >= MIN_VALIDATION_IMAGES:
            rel_train, rel_val = _split(len(fit_idx), cfg.validation_fraction, rng)
            fit_idx, val_idx = fit_idx[rel_train], fit_idx[rel_val]
        for tail in ("upper", "two-sided"):
            need = calibration_needed(0.01, tail)
            if len(cal_idx) < need:
                warn(
                    f"only {len(cal_idx)} calibration images: "
                    f"{'an' if tail == 'upper' else 'a'} {tail} test at --fpr 0.01 needs at least "
                    f"{need}; with fewer, nothing can be flagged at that rate. Add normal images or raise "
                    "--calibration-fraction."
                )
                break

        device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        vae_cfg = VAEConfig(prep.channels, prep.size, cfg.latent_dim, cfg.hidden_channels, cfg.likelihood)
        model = ConvVAE(vae_cfg)
        tcfg = TrainConfig(
            epochs=cfg.epochs,
            time_budget=cfg.time_budget,
            batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            patience=cfg.patience,
            seed=cfg.seed,
            device=str(device),
        )
        t = torch.from_numpy(pixels)
        data_fp = _fingerprint(pixels)
        identity = hashlib.sha256(
            json.dumps([data_fp, {k: v for k, v in asdict(cfg).items() if k != "device"}], sort_keys=True).encode()
        ).hexdigest()
        state = artifact.load_checkpoint(checkpoint, identity) if resume and checkpoint is not None else None

        def save_state(st: dict[str, Any]) -> None:
            if checkpoint is not None:
                artifact.save_checkpoint(checkpoint, identity, st)

        result: TrainResult = train(
            model,
            t[fit_idx],
            t[val_idx] if len(val_idx) else None,
            tcfg,
            on_epoch,
            should_stop=should_stop,
            on_checkpoint=save_state if checkpoint is not None else None,
            checkpoint_every=checkpoint_every,
            resume=state,
        )
        self.model_, self.preprocessing_, self.device_ = model, prep, device

        noise_seed = cfg.seed + 1_000_003
        self.metadata_ = {
            "config": vae_cfg.to_dict(),
            "preprocessing": prep.to_dict(),
            "noise_seed": noise_seed,
            "samples": dict(cfg.samples),
            "training": {
                "images": n,
                "train_images": len(fit_idx),
                "validation_images": len(val_idx),
                "calibration_images": len(cal_idx),
                "unreadable_images": len(unreadable),
                "ignored_files": ignored,
                "data_fingerprint": data_fp,
                "seed": cfg.seed,
                "device": str(device),
                "fit_config": {k: v for k, v in asdict(cfg).items() if k != "samples"},
                **{k: v for k, v in result.to_dict().items() if k != "history"},
            },
            "versions": {
                "vae_anomaly": __version__,
                "torch": torch.__version__,
                "numpy": np.__version__,
                "python": platform.python_version(),
            },
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        cal_pixels = pixels[cal_idx]
        self.calibration_ = {name: self._score_array(cal_pixels, name, cfg.samples[name]) for name in SCORE_NAMES}
        self.checksum_ = None
        return self

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

    def _score_pixels(self, pixels: np.ndarray, score: str, eps: torch.Tensor) -> np.ndarray:
        model, _ = self._check_fitted()
        x = torch.from_numpy(pixels).to(self.device_).float().div_(255.0)
        return score_images(model, x, score, eps).double().cpu().numpy()

    def _score_array(self, pixels: np.ndarray, score: str, samples: int, batch_size: int = 512) -> np.ndarray:
        eps = self._noise(samples)
        parts = [self._score_pixels(pixels[i : i + batch_size], score, eps) for i in range(0, len(pixels), batch_size)]
        return np.concatenate(parts) if parts else np.zeros(0)

    def _batches(self, data: ImageInput, batch_size: int) -> tuple[Iterator[ImageBatch], int]:
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
        listing: FileListing = find_images(_as_paths(data))
        return iter_batches(listing.files, prep, batch_size), listing.ignored

    def score(
        self,
        data: ImageInput,
        *,
        score: str = "elbo",
        samples: int | None = None,
        batch_size: int = 256,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> ScoreResult:
        """Score images (higher = more anomalous); unreadable files become error records."""
        return self.score_many(data, scores=(score,), samples=samples, batch_size=batch_size, on_batch=on_batch)[score]

    def score_many(
        self,
        data: ImageInput,
        *,
        scores: Sequence[str] = SCORE_NAMES,
        samples: int | None = None,
        batch_size: int = 256,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> dict[str, ScoreResult]:
        """Several score types in one pass, so each file is decoded once (`evaluate` asks for all three)."""
        for name in scores:
            if name not in SCORE_SPECS:
                raise ValueError(f"unknown score {name!r}; choose one of {', '.join(SCORE_NAMES)}")
        counts = {name: samples or self.default_samples(name) for name in scores}
        noise = {name: self._noise(n) for name, n in counts.items()}
        batches, ignored = self._batches(data, batch_size)
        paths: list[str] = []
        parts: dict[str, list[np.ndarray]] = {name: [] for name in scores}
        errors: list[ReadError] = []
        unlike: dict[str, tuple[int, str]] = {}
        for batch in batches:
            for kind, (count, example) in batch.unlike.items():
                unlike[kind] = (unlike.get(kind, (0, example))[0] + count, unlike.get(kind, (0, example))[1])
            if len(batch.pixels):
                for name in scores:
                    parts[name].append(self._score_pixels(batch.pixels, name, noise[name]))
            paths += batch.paths
            errors += batch.errors
            if on_batch is not None:
                on_batch(len(batch.paths), len(batch.errors))
        warnings = [
            f"{count} {kind} (e.g. {example}); scores of such images are less reliable"
            for kind, (count, example) in unlike.items()
        ]
        return {
            name: ScoreResult(
                list(paths),
                np.concatenate(parts[name]) if parts[name] else np.zeros(0),
                list(errors),
                name,
                counts[name],
                ignored,
                list(warnings),
            )
            for name in scores
        }

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
    ) -> Decision:
        """Conformal p-values against the calibration scores, and flags under the rule."""
        cal = self.calibration_.get(result.score)
        if cal is None or len(cal) == 0:
            raise CalibrationError(f"the model holds no calibration scores for {result.score!r}")
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
        p = p_values(cal, result.scores, tail) if len(result.scores) else np.zeros(0)
        if threshold == "auto":
            rule = auto_threshold(cal, fpr, tail)
            need = calibration_needed(fpr, tail)
            if len(cal) < need:
                warnings.append(
                    f"{len(cal)} calibration scores cannot reach p <= {fpr:g} ({tail}); at least {need} are "
                    "needed, so nothing will be flagged. Re-fit with more normal images or a larger "
                    "--calibration-fraction, or raise --fpr."
                )
        else:
            rule = score_threshold(float(threshold))
        return Decision(p, flag(result.scores, p, rule), rule, len(cal), warnings)

    # ------------------------------------------------------------ save/load
    @property
    def fingerprint(self) -> str | None:
        return self.checksum_[:16] if self.checksum_ else None

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the model file atomically; returns its checksum (the model's fingerprint)."""
        model, _ = self._check_fitted()
        cal = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in self.calibration_.items()}
        self.checksum_ = artifact.save(path, self.metadata_, model.state_dict(), cal)
        return self.checksum_

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "auto") -> Detector:
        """Rebuild config, then module, then weights; every failure is a `ModelFileError`."""
        mf = artifact.load(path)
        name = os.fsdecode(Path(path))
        try:
            meta = mf.metadata
            vae_cfg = VAEConfig.from_dict(meta["config"])
            prep = Preprocessing.from_dict(meta["preprocessing"])
            int(meta["noise_seed"])
            model = ConvVAE(vae_cfg)
            model.load_state_dict(mf.state_dict, strict=True)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise artifact.ModelFileError(
                f"{name}: the weights or settings inside do not fit together ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}). The file is damaged or was edited; re-train it."
            ) from None
        det = cls()
        det.device_ = resolve_device(device)
        det.model_ = model.to(det.device_).eval()
        det.preprocessing_ = prep
        det.metadata_ = meta
        det.calibration_ = {k: v.double().numpy() for k, v in mf.calibration.items()}
        det.checksum_ = mf.checksum
        return det

    def info(self) -> dict[str, Any]:
        """What the model was trained on and how, for `vae-anomaly info`."""
        self._check_fitted()
        return {
            "fingerprint": self.fingerprint,
            **self.metadata_,
            "calibration": {
                k: {"n": len(v), "samples": self.default_samples(k), "median": float(np.median(v)) if len(v) else None}
                for k, v in self.calibration_.items()
            },
        }
