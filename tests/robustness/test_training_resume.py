"""Training that survives: the same seed gives the same bits, an interrupted fit resumes to the model an
uninterrupted one reaches, a checkpoint of other data or a NaN loss stops with what to do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import disks
from vae_anomaly import Detector, FitConfig
from vae_anomaly.errors import ModelFileError

# ------------------------------------------------------ training that survives
SMALL = dict(latent_dim=4, seed=3, device="cpu", patience=100, batch_size=64, folds=1)


def _weights(det: Detector) -> bytes:
    return b"".join(t.numpy().tobytes() for t in det.model_.state_dict().values())


def test_same_seed_gives_byte_identical_weights_and_scores() -> None:
    x = disks(200, seed=5)
    a = Detector(FitConfig(epochs=3, **SMALL)).fit(x)
    b = Detector(FitConfig(epochs=3, **SMALL)).fit(x)
    assert _weights(a) == _weights(b)
    np.testing.assert_array_equal(a.score(x).scores, b.score(x).scores)
    np.testing.assert_array_equal(a.calibration_["iwae"], b.calibration_["iwae"])


def test_resume_reaches_the_same_model_as_an_uninterrupted_run(tmp_path: Path) -> None:
    x = disks(200, seed=5)
    whole = Detector(FitConfig(epochs=6, **SMALL)).fit(x)
    steps = iter(range(10_000))
    ckpt = tmp_path / "m.ckpt"
    cut = Detector(FitConfig(epochs=6, **SMALL)).fit(
        x,
        checkpoint=ckpt,
        checkpoint_every=0,
        should_stop=lambda: next(steps) == 9,  # mid epoch 4
    )
    assert cut.metadata_["training"]["stopped"] == "interrupted" and ckpt.exists()
    resumed = Detector(FitConfig(epochs=6, **SMALL)).fit(x, checkpoint=ckpt, resume=True, checkpoint_every=0)
    assert resumed.metadata_["training"]["epochs_run"] == 6
    assert _weights(resumed) == _weights(whole)
    np.testing.assert_array_equal(resumed.score(x).scores, whole.score(x).scores)


def test_cross_fit_interrupted_then_resumed_matches_an_uninterrupted_cross_fit(tmp_path: Path) -> None:
    from vae_anomaly.errors import FitInterrupted

    x = disks(120, seed=6)
    cfg = {**SMALL, "folds": 2}
    whole = Detector(FitConfig(epochs=3, **cfg)).fit(x)
    steps = iter(range(10_000))
    ckpt = tmp_path / "m.ckpt"
    with pytest.raises(FitInterrupted, match="model 2 of 2"):
        Detector(FitConfig(epochs=3, **cfg)).fit(
            x,
            checkpoint=ckpt,
            checkpoint_every=0,
            should_stop=lambda: next(steps) == 4,  # model 2, epoch 2
        )
    resumed = Detector(FitConfig(epochs=3, **cfg)).fit(x, checkpoint=ckpt, resume=True, checkpoint_every=0)
    for a, b in zip(whole.models_, resumed.models_, strict=True):
        assert all(torch.equal(t, u) for t, u in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    np.testing.assert_array_equal(whole.calibration_["elbo"], resumed.calibration_["elbo"])


def test_resume_refuses_a_checkpoint_of_other_data(tmp_path: Path) -> None:
    ckpt = tmp_path / "m.ckpt"
    Detector(FitConfig(epochs=1, **SMALL)).fit(disks(100, seed=1), checkpoint=ckpt, checkpoint_every=0)
    with pytest.raises(ModelFileError, match="other images or other fit options"):
        Detector(FitConfig(epochs=1, **SMALL)).fit(disks(100, seed=2), checkpoint=ckpt, resume=True)


def test_nan_loss_stops_with_the_step_and_what_to_try(monkeypatch: pytest.MonkeyPatch) -> None:
    from vae_anomaly.errors import TrainingError
    from vae_anomaly.model import train as train_mod

    monkeypatch.setattr(
        train_mod, "elbo_loss", lambda model, x, eps=None: (torch.tensor(float("nan")), torch.tensor(0.0))
    )
    with pytest.raises(TrainingError, match=r"epoch 1, step 1.*--learning-rate"):
        Detector(FitConfig(epochs=1, **SMALL)).fit(disks(50, seed=1))
