"""The time budget of `fit`: the plan from a measured speed, the budget's defaults, and a fit that keeps to it."""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from conftest import cli_run, disks, write_pngs
from vae_anomaly import Detector, FitConfig, fit_steps
from vae_anomaly.config import DEFAULT_TIME_BUDGET
from vae_anomaly.errors import ConfigError
from vae_anomaly.local import patches as local
from vae_anomaly.model import budget
from vae_anomaly.model.budget import CALIBRATION_MARGIN, SAVE_SECONDS, Speed, measure_speed, model_time, plan_fit
from vae_anomaly.model.scores import latent_noise
from vae_anomaly.model.vae import VAEConfig

# 1 ms per trained image, 0.2 ms per held-out image, 5 ms per calibration image.
SPEED = Speed(train=1e-3, held_out=2e-4, calibrate=5e-3)


def test_the_plan_caps_epochs_so_that_every_model_and_the_calibration_fit_the_budget() -> None:
    sizes = [(800, 100)]  # one epoch: 0.8 s of training + 0.02 s held out
    plan = plan_fit(sizes, 200, 128, 0, None, 30.0, spent=2.0, speed=SPEED)
    fixed = 2.0 + CALIBRATION_MARGIN * 200 * 5e-3 + SAVE_SECONDS
    assert plan.epochs == math.floor((30.0 - fixed) / 0.82) and plan.capped
    assert plan.expected <= 30.0 < plan.expected + 0.82  # one more epoch would not fit
    assert plan.default_epochs == 50


def test_cross_fitted_models_share_the_budget() -> None:
    one = plan_fit([(400, 0)], 100, 128, 0, None, 60.0, spent=0.0, speed=SPEED)
    five = plan_fit([(400, 0)] * 5, 500, 128, 0, None, 60.0, spent=0.0, speed=SPEED)
    assert five.epochs < one.epochs and five.expected <= 60.0
    assert five.models == 5 and five.calibration_images == 500


def test_without_a_budget_the_plan_runs_every_epoch_and_says_how_long_it_takes() -> None:
    plan = plan_fit([(100, 0)], 50, 128, 600, None, None, spent=1.0, speed=SPEED)
    assert plan.epochs == plan.default_epochs == 600 and not plan.capped  # 1 step per epoch: 600 steps
    assert plan.expected == pytest.approx(1.0 + CALIBRATION_MARGIN * 50 * 5e-3 + SAVE_SECONDS + 600 * 0.1)
    assert plan_fit([(100, 0)], 50, 128, 600, 7, None, spent=0.0, speed=SPEED).epochs == 7


def test_a_budget_spent_before_training_still_trains_one_epoch() -> None:
    plan = plan_fit([(1000, 0)], 10, 128, 0, None, 5.0, spent=9.0, speed=SPEED)
    assert plan.epochs == 1 and plan.expected > 5.0


def test_the_default_budget_applies_unless_epochs_or_a_budget_are_given() -> None:
    assert FitConfig().budget == DEFAULT_TIME_BUDGET
    assert FitConfig(epochs=10).budget is None
    assert FitConfig(epochs=10, time_budget=30.0).budget == 30.0
    assert FitConfig(time_budget=math.inf).budget is None
    with pytest.raises(ConfigError, match="time_budget"):
        FitConfig(time_budget=-1.0)


def test_measuring_the_speed_leaves_the_random_streams_of_training_alone() -> None:
    pixels = disks(64, seed=3)[:, None]
    noise = {"elbo-ic": latent_noise(4, 1, 0), "iwae": latent_noise(4, 4, 0)}
    before = torch.get_rng_state()
    speed = measure_speed(VAEConfig(1, 16, 4), pixels, 32, noise, torch.device("cpu"))
    assert torch.equal(before, torch.get_rng_state())
    assert speed.train > 0 and speed.held_out > 0 and speed.calibrate > 0


@pytest.mark.slow  # a real fit against a real clock: seconds
def test_a_fit_stops_at_its_budget_and_records_the_plan() -> None:
    det = Detector(FitConfig(time_budget=3.0, latent_dim=4, seed=0, device="cpu")).fit(disks(300, seed=4))
    plan = det.metadata_["training"]["plan"]
    # 5 folds of 240 images would run 300 epochs each (600 steps); 3 s for everything cannot.
    assert plan["capped"] and plan["epochs"] < plan["default_epochs"] and plan["models"] == 5
    per_model = det.metadata_["training"]["per_model"]
    assert {m["stopped"] for m in per_model} == {"time-budget"}


@pytest.mark.slow  # a real fit against a real clock: seconds
def test_the_local_statistics_banks_are_paid_from_the_budget_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Describing the patch banks takes no model, so it comes first and the plan sees its time as spent:
    a slow one (4 s here, 15 s at 1,024 px) shortens training instead of overrunning the budget."""
    slow = local.fit

    def fit_slowly(*args: Any) -> Any:
        time.sleep(4.0)
        return slow(*args)

    monkeypatch.setattr(local, "fit", fit_slowly)
    det = Detector(FitConfig(time_budget=6.0, latent_dim=4, seed=0, device="cpu", folds=2)).fit(disks(300, seed=4))
    plan = det.metadata_["training"]["plan"]
    assert plan["spent"] >= 4.0 and plan["capped"]
    # (How long the whole fit took is a benchmark's figure, never a test's: a busy machine is not a bug.)


def test_each_model_stops_at_its_share_of_the_time_left(monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget's clock is stopped at 100 s (budget.py reads `time.perf_counter`): exact shares, whatever
    else the machine is doing between two lines of this test."""
    monkeypatch.setattr(budget, "time", SimpleNamespace(perf_counter=lambda: 100.0))
    assert model_time(110.0, 2, 2.0) == 4.0
    assert model_time(95.0, 3, 0.0) == 1.0  # past the deadline: a second each, not nothing
    assert model_time(None, 2, 0.0) is None


@pytest.mark.slow  # a real fit against a real clock: seconds
def test_the_hard_stop_holds_the_budget_when_the_measured_speed_was_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine that slows down after the probe (or a probe 100x too optimistic) must not overrun."""
    monkeypatch.setattr(budget, "measure_speed", lambda *args: Speed(1e-7, 1e-7, 1e-7))
    # The plan sees half a second spent, however long reading took on a busy machine; the hard stop
    # keeps the real clock (past the deadline, each model still gets its second).
    started = time.perf_counter()
    monkeypatch.setattr(fit_steps, "time", SimpleNamespace(perf_counter=lambda: started + 0.5))
    config = FitConfig(time_budget=2.0, latent_dim=4, seed=0, device="cpu", folds=2)
    det = Detector(config).fit(disks(300, seed=4), started=started)
    plan = det.metadata_["training"]["plan"]
    assert not plan["capped"]  # the plan believed every epoch fits
    assert {m["stopped"] for m in det.metadata_["training"]["per_model"]} == {"time-budget"}


@pytest.mark.slow  # a real fit against a real clock: seconds
def test_a_probe_that_misjudged_the_speed_does_not_cut_training_short(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another job running during the probe makes the machine look slow; the clock, not the estimate, stops."""
    monkeypatch.setattr(budget, "measure_speed", lambda *args: Speed(1.0, 1.0, 1e-6))
    det = Detector(FitConfig(time_budget=4.0, latent_dim=4, seed=0, device="cpu", folds=1)).fit(disks(200, seed=6))
    plan, tr = det.metadata_["training"]["plan"], det.metadata_["training"]
    assert plan["epochs"] == 1 and plan["capped"]  # the estimate: one epoch of 144 s
    assert tr["epochs_run"] > 1


@pytest.mark.slow
def test_fit_prints_its_plan_before_training(tmp_path: Path) -> None:
    write_pngs(tmp_path / "normal", disks(60, seed=5))
    code, out, err = cli_run("fit", tmp_path / "normal", "-o", tmp_path / "m.vae", "--time-budget", "4", "--folds", "2")
    assert code == 0 and out == ""
    plan_line = next(line for line in err.splitlines() if line.startswith("plan:"))
    assert "2 models" in plan_line and "the 4 s budget" in plan_line and "images/s on this machine" in plan_line
    assert err.index("plan:") < err.index("wrote")
