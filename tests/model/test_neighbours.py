"""The default score elbo-ic-nn (neighbours.py): elbo-ic plus the latent distance to the training images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import crosses, disks
from vae_anomaly import Detector
from vae_anomaly import crossfit as cf
from vae_anomaly.errors import ConfigError
from vae_anomaly.model import neighbours
from vae_anomaly.model.inference import score_pixels
from vae_anomaly.model.neighbours import LatentBank, spread


def _means(det: Detector, k: int, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return det.models_[k].encode(torch.from_numpy(x[:, None]).float() / 255.0)[0].numpy()


def test_the_score_is_elbo_ic_plus_the_5_nearest_training_latents_each_over_its_spread(fitted: Detector) -> None:
    """The module's equation, by brute force: S_ic / IQR(S_ic) + mean of the 5 smallest distances / IQR(d_5)."""
    x = np.concatenate([disks(20, seed=41), crosses(20, seed=42)])
    assert fitted.neighbours_ is not None and len(fitted.neighbours_) == 1
    bank = fitted.neighbours_[0]
    ic = fitted.score(x, score="elbo-ic", guard=None).scores
    d = np.linalg.norm(_means(fitted, 0, x)[:, None] - bank.means[None], axis=-1)
    d5 = np.sort(d, axis=1)[:, :5].mean(1)
    got = fitted.score(x, score="elbo-ic-nn", guard=None).scores
    np.testing.assert_allclose(got, ic / bank.ic_scale + d5 / bank.distance_scale, rtol=1e-4)
    assert got[20:].min() > np.median(fitted.calibration_["elbo-ic-nn"]), "crosses score above the normal median"


def test_each_models_bank_and_spreads_come_from_the_images_it_trained_on(crossfit: Detector) -> None:
    """Calibration images never enter their model's bank or spreads, so they stay exchangeable with new ones."""
    pixels = disks(150, seed=20)
    plans = cf.plan(len(pixels), crossfit.config, np.random.default_rng(crossfit.config.seed))
    eps = crossfit._noise(crossfit.default_samples("elbo-ic-nn"))
    assert crossfit.neighbours_ is not None and len(crossfit.neighbours_) == len(plans) == 5
    for k, (train, held) in enumerate(plans):
        bank = crossfit.neighbours_[k]
        np.testing.assert_allclose(np.sort(bank.means, 0), np.sort(_means(crossfit, k, pixels[train]), 0), atol=1e-5)
        x = torch.from_numpy(pixels[train][:, None]).float() / 255.0
        ic = score_pixels(crossfit.models_[k], x, {"elbo-ic": eps}, None)["elbo-ic"]
        assert bank.ic_scale == pytest.approx(spread(ic), rel=1e-5)
        held_d = bank.distances(_means(crossfit, k, pixels[held]))
        assert held_d.min() > 0, "no held-out image sits in its own model's bank"


def test_a_model_file_without_latents_says_how_to_go_on(model_file: Path) -> None:
    det = Detector.load(model_file)
    assert det.neighbours_ is not None and det.info()["neighbours"]["latents"] == [len(det.neighbours_[0].means)]
    det.neighbours_ = None  # as in a file written before elbo-ic-nn
    with pytest.raises(ConfigError, match="re-fit it, or score with --score elbo-ic"):
        det.score(disks(3, seed=1))
    assert len(det.score(disks(3, seed=1), score="elbo-ic").scores) == 3


def test_a_bank_keeps_at_most_BANK_latents_and_needs_two(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    monkeypatch.setattr(neighbours, "BANK", 50)
    bank = LatentBank.build(rng.normal(size=(200, 4)), rng.normal(size=100), rng)
    assert bank.means.shape == (50, 4) and bank.k == 5
    small = LatentBank.build(rng.normal(size=(3, 4)), rng.normal(size=3), rng)
    assert small.k == 2 and small.distances(rng.normal(size=(7, 4))).shape == (7,)
    with pytest.raises(ValueError, match="at least 2"):
        LatentBank.build(rng.normal(size=(1, 4)), rng.normal(size=1), rng)
    saved = neighbours.arrays([bank, small])
    back = neighbours.from_arrays(saved, 2)
    assert back is not None and [b.means.shape for b in back] == [(50, 4), (3, 4)]
    with pytest.raises(ValueError, match="arrays for 1 models"):
        neighbours.from_arrays({**saved, "latent:means2": saved["latent:means0"]}, 1)
