"""How long `fit` will take on this machine, and how it keeps to its time budget.

The budget is for the whole command: decoding, every cross-fitted model's
training and held-out passes, and the calibration scores. After decoding, a
few optimiser steps of the real network on real images measure this
machine's speed, and the plan says how many epochs fit in what is left and
how long the command should take. Training itself is held by the clock,
not by the estimate: each model gets a hard stop at its share of the time
left (models that stop early leave their time to the next). On a shared
machine a probe can misjudge the speed several times over; a plan that
capped epochs from it would cut training short for nothing (measured: one
MNIST digit trained 4 epochs instead of 44 and lost 0.06 ROC-AUC).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from . import neighbours
from .devices import model_input
from .distributed import World
from .inference import calibration_scores
from .train import default_epochs, elbo_loss, held_out_loss
from .vae import ModelConfig, build_model

# Timed training steps after one warm-up step: PROBE_STEPS, or fewer when they take over PROBE_SECONDS
# (a big network), at least 2. A fraction of a second of the budget, and little for a test's tiny fits.
PROBE_STEPS = 8
PROBE_SECONDS = 0.3
SAVE_SECONDS = 1.0  # writing the model file, kept aside from the budget
# Calibration comes after training, so its time is kept aside from the start: twice the probe's
# estimate, since 16 probe images misjudge it (measured: 4.4 s estimated, 9 s taken for 2,000
# photos on a busy machine, so 10,000 photos overran a 180 s budget by 10 s).
CALIBRATION_MARGIN = 2.0


@dataclass(frozen=True)
class Speed:
    """Seconds per image on this machine, measured on the real network and images."""

    train: float  # one optimiser step's share (forward, backward, Adam)
    held_out: float  # the held-out loss of early stopping (forward only)
    calibrate: float  # every score type of one calibration image

    def epoch_seconds(self, n_train: int, n_validation: int) -> float:
        return n_train * self.train + n_validation * self.held_out


@dataclass(frozen=True)
class FitPlan:
    """What `fit` will do and how long it expects to take; shown before training starts."""

    models: int
    train_images: int  # per model
    validation_images: int  # per model
    calibration_images: int  # all models together
    epochs: int  # per model: the epochs expected to fit in the budget (the clock, not this, stops training)
    default_epochs: int  # the most each model runs: --epochs, or the default (early stopping ends most sooner)
    budget: float | None  # seconds for the whole command; None: no limit
    spent: float  # seconds already gone (start-up, decoding the images, measuring the speed)
    expected: float  # seconds for the whole command if every epoch runs
    speed: Speed

    @property
    def capped(self) -> bool:
        """True when the budget is expected to end training before its epochs run out."""
        return self.epochs < self.default_epochs

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "capped": self.capped}


def _sample(pixels: np.ndarray, n: int) -> torch.Tensor:
    idx = np.linspace(0, len(pixels) - 1, min(n, len(pixels))).astype(np.int64)
    return torch.from_numpy(np.require(pixels[idx], requirements=["W"]))


def measure_speed(
    vae_cfg: ModelConfig,
    pixels: np.ndarray,
    batch_size: int,
    noise: Mapping[str, torch.Tensor],
    device: torch.device,
) -> Speed:
    """Time training steps, a held-out pass and calibration scoring of a throwaway model.

    The model is the one `fit` will train (same shape, batch size and
    device), so the figure includes everything the network's size costs;
    its weights are thrown away and no random stream of training is touched.
    """
    state = torch.get_rng_state()

    def clock() -> float:  # a GPU runs ahead of Python: wait for its queue before reading the time
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    try:
        model = build_model(vae_cfg).to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = model_input(_sample(pixels, batch_size).to(device))

        def step() -> None:
            loss, _ = elbo_loss(model, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()

        step()  # warm-up: the first step allocates and picks kernels
        steps, t0 = 0, clock()
        while steps < 2 or (steps < PROBE_STEPS and clock() - t0 < PROBE_SECONDS):
            step()
            steps += 1
        train_s = (clock() - t0) / (steps * len(x))
        model.eval()
        held = _sample(pixels, 128)
        t0 = clock()
        held_out_loss(model, held, device)  # reads its result back: synchronised
        held_s = (clock() - t0) / len(held)
        cal = _sample(pixels, 16).numpy()
        t0 = clock()
        # elbo-ic-nn is elbo-ic (same draws, one decoder pass) and a nearest-neighbour query this throwaway
        # model has no training latents for: it is timed as elbo-ic.
        timed = {name: eps for name, eps in noise.items() if name != neighbours.SCORE}
        calibration_scores([model], cal, [np.arange(len(cal))], timed, device, World(), np.zeros(len(cal)))
        cal_s = (clock() - t0) / len(cal)
    finally:
        torch.set_rng_state(state)
    return Speed(train_s, held_s, cal_s)


def plan_fit(
    sizes: list[tuple[int, int]],
    calibration_images: int,
    batch_size: int,
    min_steps: int,
    epochs: int | None,
    budget: float | None,
    spent: float,
    speed: Speed,
) -> FitPlan:
    """How many epochs per model fit in `budget` with their held-out passes and the calibration, and how long.

    `sizes` are the (training, validation) image counts of each model;
    `epochs` is the user's own bound (None: the default, `default_epochs`).
    """
    n_train, n_val = sizes[0]
    natural = epochs or default_epochs(n_train, batch_size, min_steps)
    per_epoch = sum(speed.epoch_seconds(t, v) for t, v in sizes)  # one epoch of every model
    fixed = spent + reserve(calibration_images, speed)
    planned = natural
    if budget is not None:
        affordable = math.floor((budget - fixed) / per_epoch) if per_epoch > 0 else natural
        planned = max(1, min(natural, affordable))
    return FitPlan(
        models=len(sizes),
        train_images=n_train,
        validation_images=n_val,
        calibration_images=calibration_images,
        epochs=planned,
        default_epochs=natural,
        budget=budget,
        spent=spent,
        expected=fixed + planned * per_epoch,
        speed=speed,
    )


def reserve(calibration_images: int, speed: Speed) -> float:
    """Seconds kept for what follows training: the calibration scores, with a margin, and the write."""
    return CALIBRATION_MARGIN * calibration_images * speed.calibrate + SAVE_SECONDS


def model_time(deadline: float | None, models_left: int, reserve: float) -> float | None:
    """The hard stop of the next model: its share of what is left before `deadline` (perf_counter time).

    Never below one second, so that a model always trains a little and the
    overrun, if decoding took the whole budget, stays small.
    """
    if deadline is None:
        return None
    return max(1.0, (deadline - time.perf_counter() - reserve) / models_left)
