"""Training precision and the GPU paths: bf16 autocast trains, scores stay float32, and a model
fitted on a GPU scores the same on the CPU. The GPU tests run where torch sees CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import disks
from vae_anomaly import Detector, FitConfig
from vae_anomaly.images.batching import DecodeOptions
from vae_anomaly.model.train import held_out_loss
from vae_anomaly.model.train_config import TrainConfig
from vae_anomaly.model.train_state import EpochStats
from vae_anomaly.model.vae import ConvVAE

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TINY = dict(epochs=4, latent_dim=4, seed=0, folds=1, decode=DecodeOptions(cache=False))


def test_precision_is_float32_by_default_and_bad_values_are_refused() -> None:
    assert FitConfig().precision == "fp32"
    with pytest.raises(ValueError, match="precision"):
        FitConfig(precision="fp8")
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="half")


def test_bf16_training_on_the_cpu_learns_and_records_its_precision() -> None:
    epochs: list[EpochStats] = []
    det = Detector(FitConfig(device="cpu", precision="bf16", **TINY)).fit(disks(300, seed=1), on_epoch=epochs.append)
    training = det.metadata_["training"]
    assert training["precision"] == "bf16"
    assert [s.epoch for s in epochs] == [1, 2, 3, 4]
    train_loss = [s.train_loss for s in epochs]
    val_loss = [s.val_loss for s in epochs]
    assert all(v is not None and np.isfinite(v) for v in train_loss + val_loss), (train_loss, val_loss)
    assert training["final_train_loss"] == train_loss[-1]
    # It learns: in four epochs the training loss (about 200 nats after the first) and the held-out
    # loss fall by far more than one-sample ELBO estimates wander; without the optimiser's steps
    # the training loss stays near 235 nats.
    assert train_loss[-1] < train_loss[0] - 100, train_loss
    assert val_loss[-1] < val_loss[0] - 50, val_loss
    # And the fitted network explains unseen disks far better than the same network untrained.
    unseen = torch.from_numpy(disks(100, seed=2)[:, None].copy())
    torch.manual_seed(0)
    untrained = ConvVAE(det.model_.config)
    trained_nats = held_out_loss(det.model_, unseen, torch.device("cpu"))
    untrained_nats = held_out_loss(untrained, unseen, torch.device("cpu"))
    assert trained_nats < untrained_nats - 100, (trained_nats, untrained_nats)
    for scores in det.calibration_.values():
        assert scores.dtype == np.float64 and np.all(np.isfinite(scores))


@cuda
def test_a_gpu_fit_in_bf16_scores_the_same_on_the_gpu_and_the_cpu(tmp_path: Path) -> None:
    det = Detector(FitConfig(device="cuda", precision="bf16", **TINY)).fit(disks(600, seed=1))
    assert det.metadata_["training"]["precision"] == "bf16"
    det.save(tmp_path / "m.vae")
    images = disks(50, seed=2)
    on_gpu = Detector.load(tmp_path / "m.vae", "cuda").score(images)
    on_cpu = Detector.load(tmp_path / "m.vae", "cpu").score(images)
    np.testing.assert_allclose(on_gpu.scores, on_cpu.scores, rtol=1e-4)


@cuda
def test_a_set_too_large_for_gpu_memory_is_fed_from_pinned_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (1024, 1 << 40))  # "almost full"
    det = Detector(FitConfig(device="cuda", precision="fp32", **TINY)).fit(disks(300, seed=1))
    assert np.isfinite(det.metadata_["training"]["final_train_loss"])


@cuda
def test_the_gpu_nan_check_still_stops_a_diverging_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the loss is read back every few steps, not every step; a NaN still stops training."""
    from vae_anomaly.errors import TrainingError
    from vae_anomaly.model import train as train_mod

    def nan_loss(model: torch.nn.Module, x: torch.Tensor, eps: torch.Tensor | None = None) -> tuple:
        out, mu, _ = model(x, eps)
        return out.sum() * float("nan"), mu.sum() * 0

    monkeypatch.setattr(train_mod, "elbo_loss", nan_loss)
    with pytest.raises(TrainingError, match=r"epoch 1, steps? .*--learning-rate"):
        Detector(FitConfig(device="cuda", **TINY)).fit(disks(300, seed=1))
