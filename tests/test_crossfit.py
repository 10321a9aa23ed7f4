"""Small normal sets: K cross-fitted models, cross-conformal p-values, model file format 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli_run, crosses, disks, write_pngs
from vae_anomaly import Detector
from vae_anomaly.decision.calibration import smallest_p_value


@pytest.mark.slow
def test_small_sets_cross_fit_by_default_and_every_image_calibrates(crossfit: Detector) -> None:
    assert crossfit.n_models == 5 and len(crossfit.models_) == 5
    assert len(crossfit.calibration_["elbo"]) == 150
    assert np.bincount(crossfit.calibration_folds_).tolist() == [30] * 5
    assert crossfit.metadata_["training"]["train_images"] == 120, "each model trains on (K-1)/K of the images"


@pytest.mark.slow
def test_held_out_normal_p_values_are_close_to_uniform(crossfit: Detector) -> None:
    """As in the split-conformal test: the flagged share of m new normals varies around alpha by
    about sqrt(a(1-a)(1/(n+2) + 1/m)) (the calibration set is one draw); allow three of those."""
    result = crossfit.score(disks(1000, seed=21))
    n, m = 150, 1000
    for tail in ("upper", "two-sided"):
        p = crossfit.p_values(result, tail)
        assert np.all((p > 0) & (p <= 1))
        for a in (0.1, 0.2, 0.5):
            sd = math.sqrt(a * (1 - a) * (1 / (n + 2) + 1 / m))
            assert abs((p <= a).mean() - a) <= 3 * sd, (tail, a, (p <= a).mean())


@pytest.mark.slow
def test_150_images_reach_p_below_one_percent_where_a_split_cannot(crossfit: Detector) -> None:
    assert smallest_p_value(30) > 0.01, "a 20% split of 150 leaves 30: exact p >= 1/31"
    assert crossfit.smallest_p_value("elbo") == pytest.approx(1 / 151)
    decision = crossfit.decide(crossfit.score(crosses(100, seed=22), score="elbo", guard=None), fpr=0.01, tail="upper")
    assert decision.flags.mean() >= 0.3 and decision.p_values.min() < 0.01  # 0.49 with this small model
    assert decision.threshold.models == 5 and "cross-conformal over 5" in decision.threshold.describe()


@pytest.mark.slow
def test_cross_fitted_model_file_round_trips(crossfit: Detector, tmp_path: Path) -> None:
    path = tmp_path / "cf.vae"
    crossfit.save(path)
    assert torch.load(path, weights_only=True)["format_version"] == 2
    loaded = Detector.load(path, device="cpu")
    x = np.concatenate([disks(20, seed=23), crosses(5, seed=24)])
    a, b = crossfit.score(x), loaded.score(x)
    np.testing.assert_array_equal(a.model_scores, b.model_scores)
    np.testing.assert_array_equal(crossfit.p_values(a), loaded.p_values(b))
    assert loaded.info()["models"] == 5 and loaded.info()["training"]["folds"] == 5


def test_cli_cross_fits_a_small_folder_and_score_states_the_smallest_p(tmp_path: Path) -> None:
    write_pngs(tmp_path / "normal", disks(30, seed=26))
    write_pngs(tmp_path / "new", disks(4, seed=27))
    model = tmp_path / "m.vae"
    code, out, err = cli_run("fit", tmp_path / "normal", "-o", model, "--epochs", "1", "--device", "cpu")
    assert code == 0 and out == ""
    assert "cross-fitting: model 5 of 5" in err and "5 cross-fitted models" in err
    assert "smallest reachable p-value 0.03226" in err, "1/31 with all 30 images calibrating"
    code, out, _ = cli_run("score", tmp_path / "new", "-m", model, "--format", "json")
    s = json.loads(out)["summary"]
    assert code == 0 and s["models"] == 5 and s["calibration_images"] == 30
    assert s["smallest_p_value"] == pytest.approx(1 / 31)  # one test of score and guard, both sides
    assert s["effective_fpr"] == pytest.approx(1 / 31) and s["threshold"]["requested"] == 0.01, "30 images: 3.2%"
    assert "cross-conformal over 5 models" in s["guarantee"] and "0.01 asked for is below" in s["guarantee"]
    assert any(
        "with 30 normal calibration images no image can be flagged at 1%" in w for w in json.loads(out)["warnings"]
    )
    code, out, _ = cli_run("score", tmp_path / "new", "-m", model)
    assert "5 cross-fitted models, 30 normal scores; smallest reachable p-value 0.03226" in out


def test_a_small_cross_fitted_set_gates_a_dirty_batch_at_the_rate_it_can_reach(
    crossfit: Detector, tmp_path: Path
) -> None:
    """150 normal images: 1/151 = 0.66% is the floor, so the default 1% is reached exactly, without a
    warning; --fpr 0.005 is below it: the rule flags at the floor, says so, and the gate fails on
    crosses; --strict-fpr keeps exact p-values only, nothing flagged and the gate passes."""
    model = tmp_path / "cf.vae"
    crossfit.save(model)
    write_pngs(tmp_path / "dirty", np.concatenate([disks(40, seed=28), crosses(10, seed=29)]))
    code, out, err = cli_run("score", tmp_path / "dirty", "-m", model, "--format", "json", "--max-anomalies", "0")
    s = json.loads(out)["summary"]
    assert code == 1 and s["flagged"] >= 5 and s["effective_fpr"] == 0.01 and "reach" not in err
    assert s["guarantee"].startswith("Each normal image is flagged with probability at most 0.01 (cross-conformal")
    args = ("--format", "json", "--max-anomalies", "0", "--fpr", "0.005")
    code, out, err = cli_run("score", tmp_path / "dirty", "-m", model, *args)
    s = json.loads(out)["summary"]
    assert code == 1 and s["flagged"] >= 5 and s["effective_fpr"] == pytest.approx(1 / 151)
    assert "no image can be flagged at 0.5%; flagging at 0.66%, the smallest rate these images allow" in err
    assert s["guarantee"].startswith("Each normal image is flagged with probability at most 0.006623 (cross-conformal")
    strict = (*args, "--strict-fpr")
    code, out, _ = cli_run("score", tmp_path / "dirty", "-m", model, *strict)
    s = json.loads(out)["summary"]
    assert code == 0 and s["flagged"] == 0 and s["effective_fpr"] == 0.005
