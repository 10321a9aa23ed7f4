"""The training loop's options and their defaults (`fit` shows and uses them). No torch."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..validation import check_choice, check_device, check_float, check_int

LIKELIHOODS: tuple[str, ...] = ("bernoulli", "gaussian")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
MAX_SEED = 2**62  # numpy and torch generators both take it; the noise seed adds 1,000,003


@dataclass
class TrainConfig:
    """How long and how to train: the training loop's options, and the defaults `fit` shows and uses."""

    # Upper bound; early stopping usually ends sooner. None: 50 epochs, or more for
    # small data sets so that training takes at least `min_steps` optimiser steps
    # (30 epochs of 100 images would be only 30 steps).
    epochs: int | None = None
    min_steps: int = 600
    time_budget: float | None = None  # seconds; stops mid-epoch when reached
    batch_size: int = 128  # fast on 2 CPU cores, still many steps per epoch
    learning_rate: float = 1e-3  # Adam's usual default works for this small network
    patience: int = 5  # epochs without held-out improvement before stopping
    seed: int = 0
    device: str = "cpu"
    # "bf16" runs the forward pass under bf16 autocast (weights, optimiser and the loss's sums stay
    # float32; scores are always float32). Measured on an H100 (benchmarks/gpu_check.py) this small
    # network trains slower in bf16, 18,600 against 23,600 images/s (its kernels are too small to
    # gain), so float32 is the default; bf16 is for larger images on GPUs.
    precision: str = "fp32"

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, 1, none=True)
        check_int("min_steps", self.min_steps, 0)
        check_float("time_budget", self.time_budget, 0, math.inf, lo_open=True, hi_open=True, none=True)
        check_int("batch_size", self.batch_size, 1)
        check_float("learning_rate", self.learning_rate, 0, 1, lo_open=True, hi_open=True)
        check_int("patience", self.patience, 1)
        check_int("seed", self.seed, 0, MAX_SEED)
        check_device(self.device)
        check_choice("precision", self.precision, PRECISIONS)
