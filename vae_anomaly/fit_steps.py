"""The steps of `fit` between reading the training images and a calibrated model, each timed as a phase:
what the VAE models (features or pixels), the local statistic's banks, the time plan, and the calibration
of every score on the images each model never trained on. `Detector.fit` runs them in order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from . import crossfit
from .config import FitConfig
from .local import patches as local
from .local import tiles
from .local.patches import PatchBank
from .local.tiles import TileBank
from .model import backbone, budget, inference, neighbours
from .model.budget import FitPlan
from .model.distributed import current
from .model.feature_vae import FeatureVAEConfig
from .model.neighbours import LatentBank
from .model.train_config import TrainConfig
from .model.vae import VAE, ModelConfig, VAEConfig

Plans = Sequence[tuple[np.ndarray, np.ndarray]]  # each model's (training, calibration) positions


class Phases:
    """The phases of a fit: a line for each as it starts and ends, and the seconds each took."""

    def __init__(self, on_phase: Callable[[str], None] | None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.on_phase, self.clock = on_phase, clock
        self.seconds: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def start(self, name: str, line: str) -> None:
        self._current = (name, self.clock())
        if self.on_phase is not None:
            self.on_phase(line)

    def end(self, line: str) -> None:
        assert self._current is not None
        name, t0 = self._current
        self.seconds[name] = self.clock() - t0
        if self.on_phase is not None:
            self.on_phase(f"{line} ({self.seconds[name]:.1f} s)")


def model_inputs(
    images: crossfit.TrainingImages, cfg: FitConfig, device: torch.device, phases: Phases
) -> tuple[np.ndarray, np.ndarray | None, ModelConfig, backbone.Features | None]:
    """What the VAE models, computed once: the backbone's features of every image, or the pixels
    (with their PNG lengths, for `elbo-ic`); the VAE's config for it; the backbone, if used."""
    prep = images.prep
    if images.features != "backbone":
        vae_cfg: ModelConfig = VAEConfig(prep.channels, prep.size, cfg.latent_dim, cfg.hidden_channels, cfg.likelihood)
        return images.pixels, images.bits, vae_cfg, None
    phases.start("features", f"features: {backbone.NAME} on {len(images.pixels):,} images")
    network = backbone.Features(device)
    features = network(images.pixels)
    phases.end(f"features: {backbone.DIM} values per image ({network.engine})")
    vae_cfg = FeatureVAEConfig(backbone.DIM, cfg.latent_dim, image_size=prep.size, in_channels=prep.channels)
    return features, None, vae_cfg, network


def local_banks(
    images: crossfit.TrainingImages, cfg: FitConfig, plans: Plans, rng: np.random.Generator, phases: Phases
) -> tuple[PatchBank, TileBank | None, np.ndarray]:
    """The local statistic's banks (both scales), and each image's value against the banks of the
    folds it is not in. It needs no model: described before training, its time is in the plan's
    `spent`, so that training gets only what is left of the budget (after it, they overran a
    180 s budget by 9-12% at 256 and 1,024 px)."""
    phases.start("local", "local statistic: describing patches and choosing the banks")
    patch_bank, held_out = local.fit(images.pixels, plans, rng)
    sides = np.stack([images.facts.properties["width"], images.facts.properties["height"]], 1).astype(np.int64)
    prep = images.prep
    tile_bank, tiled = tiles.fit(images.files, sides, prep.channels, prep.size, plans, cfg.tile, rng)
    phases.end("local statistic: banks ready" + (", tiles too" if tile_bank is not None else ""))
    return patch_bank, tile_bank, np.asarray(np.maximum(held_out, tiled))


def fit_plan(
    cfg: FitConfig,
    vae_cfg: ModelConfig,
    inputs: np.ndarray,
    noise: Mapping[str, torch.Tensor],
    device: torch.device,
    plans: Plans,
    started: float,
) -> FitPlan:
    """This machine's measured speed (one for every process) and the epochs that fit the budget."""
    world = current()
    speed = budget.measure_speed(vae_cfg, inputs, cfg.batch_size, dict(noise), device)
    if world.size > 1:
        speed = world.broadcast_object(speed)  # one plan for every process
    n_calibration = sum(len(c) for _, c in plans)
    sizes = crossfit.model_sizes(plans, cfg)
    spent = time.perf_counter() - started
    min_steps = TrainConfig().min_steps
    return budget.plan_fit(sizes, n_calibration, cfg.batch_size, min_steps, cfg.epochs, cfg.budget, spent, speed)


def calibration(
    models: Sequence[VAE],
    inputs: np.ndarray,
    bits: np.ndarray | None,
    plans: Plans,
    noise: dict[str, torch.Tensor],
    device: torch.device,
    rng: np.random.Generator,
) -> tuple[tuple[LatentBank, ...], dict[str, np.ndarray]]:
    """Every score of the decision on the images each model never trained on, with the latent
    neighbours' banks (`elbo-ic-nn`) from the images each trained on."""
    folds = [c for _, c in plans]
    banks = inference.latent_banks(
        list(models), inputs, [f for f, _ in plans], noise[neighbours.SCORE], device, bits, rng
    )
    scores = inference.calibration_scores(list(models), inputs, folds, noise, device, current(), bits, banks=banks)
    return banks, scores
