"""The options of `fit` (`FitConfig`, what the CLI builds) and the defaults of splits, folds and tiles.

Every config validates every field on construction (the range allowed and
the value received), so a bad option fails before any image is read.
The score table is in `score_table.py`, the training loop's options in
`train_config.py`. No torch: the CLI can import this cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import ConfigError
from .images.batching import DecodeOptions
from .model.score_table import MAX_SAMPLES, SCORE_NAMES, default_samples
from .model.train_config import LIKELIHOODS, TrainConfig
from .validation import check_choice, check_device, check_float, check_int

# What the VAE models: a pretrained backbone's features, the pixels, or the rule in feature_vae.choose_features.
FEATURES: tuple[str, ...] = ("auto", "backbone", "pixels")

# ------------------------------------------------------------------ splits and folds
MIN_TRAINING_IMAGES = 10
MIN_VALIDATION_IMAGES = 20  # below this, early stopping would chase noise
# Below this many readable normal images `fit` cross-fits by default, so that
# every image becomes a calibration score. The default decision is one test
# (floor 1/(n+1)): 99 calibration scores reach 1% exactly, which a 20% split
# gives from 495 images on. Measured (benchmarks/small_sets.py, benchmarks/README.md): at
# 1,000 images one split model trains 4-7x faster than 5 folds with the same
# false-positive rate and detection within the repetitions' spread; at 300,
# a split's 60 calibration scores leave 1% to the tail model and its rate
# wandered (0.25% and 3.8% in two fits), where 5 folds held 0.6%.
CROSS_FIT_BELOW = 500
# Over a backbone's features each model trains in seconds: cross-fitting to this many images makes every image
# calibrate (200 calibration images of 1,000 photos put the 1% cut-off at their second largest value; 1,000 at
# their tenth), at the cost of the local statistic of every image at fit.
CROSS_FIT_FEATURES_BELOW = 5000
DEFAULT_FOLDS = 5
# Seconds for the whole `fit` (decoding, every model, calibration) unless --epochs or --time-budget
# says otherwise: a few thousand photos fit in it on 2 CPU cores (benchmarks/photos.py, benchmarks/README.md).
DEFAULT_TIME_BUDGET = 180.0
MAX_FOLDS = 20
MIN_TILE = 16  # px: smaller tiles than this would show less than a working-size patch of detail

_TRAIN = TrainConfig()


@dataclass
class FitConfig:
    """Every option of `fit`; the CLI builds one of these and nothing else."""

    image_size: int | None = None  # None: from the data
    latent_dim: int = 16
    likelihood: str = "gaussian"
    hidden_channels: tuple[int, ...] = ()  # (): from the image size (model.default_hidden_channels)
    epochs: int | None = _TRAIN.epochs  # None: 50, or enough for 600 steps on small data sets
    # Seconds for the whole fit: decoding, every fold, calibration. None: DEFAULT_TIME_BUDGET,
    # or no limit when `epochs` is given; math.inf: no limit.
    time_budget: float | None = None
    batch_size: int = _TRAIN.batch_size
    learning_rate: float = _TRAIN.learning_rate
    patience: int = _TRAIN.patience
    calibration_fraction: float = 0.2  # of the normal images, never trained on
    validation_fraction: float = 0.1  # of the rest, for early stopping only
    seed: int = _TRAIN.seed
    device: str = "auto"
    precision: str = _TRAIN.precision  # see TrainConfig
    # Monte Carlo samples per score type; a score left out keeps its default.
    samples: dict[str, int] = field(default_factory=default_samples)
    max_unreadable_fraction: float = 0.1
    # Cross-fitting: K models, each trained on K-1 folds and scoring the fold it
    # did not see, so every image becomes a calibration score. None: 5 folds
    # below CROSS_FIT_BELOW readable images, else 1 (one split, one model).
    folds: int | None = None
    # Worker processes and the decoded-pixel cache: how fast files are read, never what the model learns.
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    # The local statistic's tiles, in file pixels (tiles.py): None for the automatic rule, 0 for none.
    tile: int | None = None
    # What the VAE models (FEATURES): "auto" picks per training set (feature_vae.choose_features).
    features: str = "auto"

    def __post_init__(self) -> None:
        check_int("image_size", self.image_size, 4, 1024, none=True)
        check_choice("features", self.features, FEATURES)
        if self.tile != 0:
            check_int("tile", self.tile, MIN_TILE, none=True)
        check_int("latent_dim", self.latent_dim, 1, 4096)
        check_choice("likelihood", self.likelihood, LIKELIHOODS)
        channels = tuple(self.hidden_channels) if isinstance(self.hidden_channels, (tuple, list)) else None
        if channels is None or len(channels) > 8:
            raise ConfigError(
                f"hidden_channels must be a tuple of up to 8 channel counts, got {self.hidden_channels!r}"
            )
        for c in channels:
            check_int("each of hidden_channels", c, 1, 4096)
        self.hidden_channels = channels
        check_float("calibration_fraction", self.calibration_fraction, 0, 1, lo_open=True, hi_open=True)
        check_float("validation_fraction", self.validation_fraction, 0, 1, hi_open=True)
        check_float("max_unreadable_fraction", self.max_unreadable_fraction, 0, 1)
        check_int("folds", self.folds, 1, MAX_FOLDS, none=True)
        check_device(self.device)
        if not isinstance(self.samples, dict):
            raise ConfigError(f"samples must map score names to sample counts, got {self.samples!r}")
        for name, n in self.samples.items():
            check_choice("a samples key", name, SCORE_NAMES)
            check_int(f"samples[{name!r}]", n, 1, MAX_SAMPLES)
        self.samples = {**default_samples(), **self.samples}
        if not isinstance(self.decode, DecodeOptions):
            raise ConfigError(f"decode must be a DecodeOptions, got {self.decode!r}")
        if self.time_budget != math.inf:
            check_float("time_budget", self.time_budget, 0, math.inf, lo_open=True, hi_open=True, none=True)
        self.train_config(fold=0, epochs=self.epochs, time_budget=None, device="cpu")  # the loop's own checks

    @property
    def budget(self) -> float | None:
        """Seconds for the whole fit, or None for no limit (see `time_budget`)."""
        if self.time_budget is None:
            return None if self.epochs is not None else DEFAULT_TIME_BUDGET
        return None if self.time_budget == math.inf else self.time_budget

    def train_config(self, *, fold: int, epochs: int | None, time_budget: float | None, device: str) -> TrainConfig:
        """The training loop's options for model `fold`, with the epochs and hard stop `budget.py` planned."""
        return TrainConfig(
            epochs=epochs,
            time_budget=time_budget,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            patience=self.patience,
            seed=self.seed + fold,
            device=device,
            precision=self.precision,
        )
