"""The local statistic (local.py): a small defect is found, where it is, at a calibrated rate."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from vae_anomaly import Detector, FitConfig
from vae_anomaly.decision.calibration import p_values
from vae_anomaly.decision.checks import key
from vae_anomaly.decision.rule import DecisionRule
from vae_anomaly.local.patches import NAME, PatchBank, coreset, fit, geometry, native_box, region


def textures(n: int, seed: int, size: int = 32) -> np.ndarray:
    """Smooth random grey textures, uint8 (n, size, size)."""
    rng = np.random.default_rng(seed)
    f = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), (0, 1.5, 1.5))
    f = (f - f.mean(axis=(1, 2), keepdims=True)) / f.std(axis=(1, 2), keepdims=True)
    return np.clip(128 + 40 * f, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def textured() -> Detector:
    return Detector(FitConfig(epochs=2, latent_dim=4, seed=0, device="cpu", folds=1)).fit(textures(400, seed=1))


def test_a_pasted_spot_raises_the_local_statistic_and_is_boxed_where_it_is(textured: Detector) -> None:
    clean = textures(100, seed=2)
    spotted = clean.copy()
    spotted[:, 20:26, 4:10] = 250  # 6x6 of 32x32: 3.5% of the area
    rc, rs = textured.score(clean), textured.score(spotted)
    assert rc.facts is not None and rs.facts is not None and rs.facts.regions is not None
    local_c, local_s = rc.facts.properties[NAME], rs.facts.properties[NAME]
    assert np.median(local_s) > np.max(local_c), "every spotted image is farther from normal patches than clean ones"
    x0, y0, x1, y1 = np.median(rs.facts.regions, axis=0)
    assert x0 <= 4 and x1 >= 10 and y0 <= 20 and y1 >= 26, "the box covers the spot"
    assert (x1 - x0) * (y1 - y0) <= 0.25 * 32 * 32, "and little else"
    flags = textured.decide(rs).flags
    assert flags.mean() >= 0.9 and textured.decide(rc).flags.mean() <= 0.05


def test_calibration_values_come_from_a_bank_that_never_saw_them(textured: Detector) -> None:
    """New normal images are flagged by the local statistic alone at about the level asked."""
    cal = textured.calibration_[key(NAME)]
    assert len(cal) == 80 and np.all(np.isfinite(cal))
    fresh = textured.score(textures(600, seed=3)).facts
    assert fresh is not None
    p = p_values(cal, fresh.properties[NAME], "upper")
    assert abs(float(np.mean(p <= 0.1)) - 0.1) < 0.06  # a bank holding these images would put them at ~0


def test_each_bank_holds_patches_of_its_models_training_images_only() -> None:
    x = textures(120, seed=5)[:, None]
    folds = [(np.arange(0, 60), np.arange(60, 120)), (np.arange(60, 120), np.arange(0, 60))]
    bank, held = fit(x, folds, np.random.default_rng(0))
    assert len(bank.banks) == 2 and held.shape == (120,)
    for k, (train, out) in enumerate(folds):
        seen = bank.distances(x[train], fold=k).reshape(len(train), -1).min(1)
        unseen = bank.distances(x[out], fold=k).reshape(len(out), -1).min(1)
        assert np.mean(seen < 1e-3) > 0.5 and np.all(unseen > 1e-3), f"bank {k} holds its training patches only"
    order = np.concatenate([out for _, out in folds])
    again = np.concatenate([bank.statistic(x[out], fold=k)[0] for k, (_, out) in enumerate(folds)])
    assert np.allclose(held, again) and len(order) == len(held)


def test_a_new_image_is_measured_against_the_one_bank_its_pixels_pick() -> None:
    """One search instead of K: the bank is a hash of the pixels, so an image gets the same value in
    any batch, order or run."""
    x = textures(120, seed=5)[:, None]
    folds = [(np.arange(0, 60), np.arange(60, 120)), (np.arange(60, 120), np.arange(0, 60))]
    bank, _ = fit(x, folds, np.random.default_rng(0))
    fresh = textures(40, seed=6)[:, None]
    picks = bank.bank_of(fresh)
    assert set(picks.tolist()) == {0, 1}, "both banks take their share"
    assert np.array_equal(picks, bank.bank_of(fresh[::-1])[::-1]) and np.array_equal(picks, bank.bank_of(fresh.copy()))
    d, phi = bank.distances(fresh), bank.descriptors(fresh)
    for k in (0, 1):
        brute = cdist(phi[picks == k].reshape(-1, phi.shape[-1]), bank.banks[k]).min(1)
        assert np.allclose(d[picks == k].ravel(), brute, atol=1e-3), f"bank {k} alone"
    alone = np.array([bank.statistic(fresh[i : i + 1])[0][0] for i in range(len(fresh))])
    assert np.allclose(alone, bank.statistic(fresh)[0]), "the same value alone as in a batch"


def test_new_normal_images_pass_the_cross_fitted_statistic_at_the_level_asked() -> None:
    """Bank k never saw a new image nor fold k's held-out images: the new value is exchangeable with
    theirs, so the pooled conformal p-value holds its level (400 calibration, 2,000 new images)."""
    x = textures(400, seed=7)[:, None]
    fold_of = np.arange(400) % 4
    folds = [(np.nonzero(fold_of != k)[0], np.nonzero(fold_of == k)[0]) for k in range(4)]
    bank, held = fit(x, folds, np.random.default_rng(0))
    p = p_values(held, bank.statistic(textures(2000, seed=8)[:, None])[0], "upper")
    for level in (0.05, 0.1, 0.2):
        assert abs(float(np.mean(p <= level)) - level) < 0.3 * level + 0.01, f"at {level}"


def test_the_bank_coreset_keeps_rare_normal_patches_a_random_sample_drops() -> None:
    """Greedy k-center: 5 rare patches among 20,000 common ones all get into a bank of 64, and every
    patch lies closer to the bank than to a random sample of the same size."""
    rng = np.random.default_rng(0)
    common = rng.normal(size=(20_000, 6)).astype(np.float32)
    rare = (12.0 + rng.normal(size=(5, 6)) + 6.0 * np.arange(5)[:, None]).astype(np.float32)
    phi = np.concatenate([common, rare])
    chosen = coreset(phi, 64, np.random.default_rng(1))
    assert len(np.unique(chosen)) == 64 and set(range(20_000, 20_005)) <= set(chosen.tolist())

    def radius(bank: np.ndarray) -> float:
        return float(np.sqrt(((phi[:, None] - bank[None]) ** 2).sum(-1).min(1)).max())

    assert radius(phi[chosen]) < 0.5 * radius(phi[rng.choice(len(phi), 64, replace=False)])
    assert np.array_equal(coreset(phi[:10], 64, rng), np.arange(10)), "a small set is kept whole"


def test_the_decision_tests_the_local_statistic_on_its_upper_side_only(textured: Detector, tmp_path: Path) -> None:
    """The sides are stored in the model file at fit, and the stored ones decide, not today's defaults."""
    rule = DecisionRule()
    stats = rule.statistics_in(textured.calibration)
    tails = dict(zip(stats, rule.tails_for(stats, textured.calibration), strict=True))
    assert tails[key(NAME)] == "upper" and tails[key("brightness")] == "two-sided"
    assert tails[key("sharpness")] == "lower" and tails[key("balance-x")] == "two-sided"
    textured.save(tmp_path / "m.vae")
    again = Detector.load(tmp_path / "m.vae")
    sides = again.calibration.sides
    assert sides == textured.metadata_["checks"]["sides"] and sides is not None and sides["local"] == "upper"
    edited = replace(again.calibration, sides={**sides, "brightness": "lower"})
    assert dict(zip(stats, rule.tails_for(stats, edited), strict=True))[key("brightness")] == "lower"
    older = replace(again.calibration, sides=None)  # a file written before the sides were stored
    assert rule.tails_for(stats, older) == rule.tails_for(stats, again.calibration)


def test_the_model_file_keeps_the_banks(textured: Detector, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "m.vae"
    textured.save(path)
    again = Detector.load(path)
    assert isinstance(again.patches_, PatchBank) and textured.patches_ is not None
    x = textures(5, seed=4)
    assert np.allclose(textured.patches_.statistic(x)[0], again.patches_.statistic(x)[0])
    assert not any(k.startswith("local:") for k in again.calibration_), "the bank is not a calibration score"


def test_region_and_native_box() -> None:
    p, stride = geometry(48)
    assert (p, stride) == (8, 4)
    grid = np.zeros((11, 11))
    grid[2, 3] = grid[2, 4] = 5.0
    grid[9, 9] = 4.0  # past the bound too, but not connected to the farthest patch
    assert region(grid, 48, 1.0) == (12, 8, 24, 16)
    assert native_box((12, 8, 24, 16), 48, 480, 96) == [120, 16, 240, 32]
    assert region(grid, 48, 9.0) == (12, 8, 24, 16), "none past the bound: the farthest, with its equal neighbour"
    grid[2, 4] = 4.9
    assert region(grid, 48, 9.0) == (12, 8, 20, 16), "a lone farthest patch"
    assert region(np.full((11, 11), 0.3), 48, 1.0) == (0, 0, 48, 48), "a flat image: every patch alike"
