"""Conformal p-values, the auto threshold, and their error rates."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import BACKGROUND, SIZE, crosses, disks
from vae_anomaly import Detector
from vae_anomaly.calibration import calibration_needed, p_values, smallest_p_value
from vae_anomaly.decision import auto_threshold, flag


def test_p_values_follow_the_conformal_formulas() -> None:
    cal = np.array([1.0, 2.0, 3.0, 4.0])
    s = np.array([0.5, 2.0, 5.0])
    np.testing.assert_allclose(p_values(cal, s, "upper"), [5 / 5, 4 / 5, 1 / 5])
    # p_low = (1 + #{<= s}) / 5 = 1/5, 3/5, 5/5; two-sided = min(1, 2 * min(high, low)).
    np.testing.assert_allclose(p_values(cal, s, "two-sided"), [2 / 5, 1.0, 2 / 5])


def test_smallest_reachable_p_value_and_calibration_needed_agree() -> None:
    for tail in ("upper", "two-sided"):
        for alpha in (0.1, 0.05, 0.01, 0.003):
            n = calibration_needed(alpha, tail)
            assert smallest_p_value(n, tail) <= alpha + 1e-12
            assert smallest_p_value(n - 1, tail) > alpha


@settings(max_examples=200, deadline=None)
@given(
    cal=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=60),
    new=st.lists(st.floats(-1.2e3, 1.2e3, allow_nan=False), min_size=1, max_size=30),
    alpha=st.floats(0.01, 0.5),
    tail=st.sampled_from(["upper", "two-sided"]),
)
def test_auto_score_bounds_flag_exactly_the_images_with_p_at_most_alpha(
    cal: list[float], new: list[float], alpha: float, tail: str
) -> None:
    c, s = np.array(cal), np.array(new)
    thr = auto_threshold(c, alpha, tail)
    by_p = flag(s, p_values(c, s, tail), thr)
    by_bounds = np.zeros(len(s), bool)
    if thr.high is not None:
        by_bounds |= s >= thr.high
    if thr.low is not None:
        by_bounds |= s <= thr.low
    np.testing.assert_array_equal(by_p, by_bounds)


def test_false_positive_rate_on_held_out_normals_is_near_the_target(fitted: Detector) -> None:
    """Conformal guarantee: E[FPR] <= alpha. With n calibration and m test images the
    flagged share has sd about sqrt(a(1-a)(1/(n+2) + 1/m)); allow three of them above."""
    normal = fitted.score(disks(1500, seed=99))
    n, m, a = len(fitted.calibration_["elbo"]), 1500, 0.05
    sd = math.sqrt(a * (1 - a) * (1 / (n + 2) + 1 / m))
    for tail in ("two-sided", "upper"):
        rate = fitted.decide(normal, fpr=a, tail=tail).flags.mean()
        assert a - 3 * sd <= rate <= a + 3 * sd, (tail, rate, sd)


def test_anomalies_get_small_p_values(fitted: Detector) -> None:
    d = fitted.decide(fitted.score(crosses(100, seed=4)), fpr=0.01)
    assert d.flags.mean() >= 0.9


def test_blank_image_is_flagged_two_sided_but_not_upper(fitted: Detector) -> None:
    """-ELBO ranks a blank frame as more normal than any normal image (Nalisnick et al. 2019)."""
    blank = fitted.score(np.full((1, SIZE, SIZE), BACKGROUND, np.uint8), score="elbo", guard=None)
    assert fitted.decide(blank).flags[0], "a blank frame is too simple to be normal"
    assert not fitted.decide(blank, tail="upper").flags[0], "the upper tail alone cannot see it"


def test_default_score_and_guard_flag_a_blank_frame_on_either_tail(fitted: Detector) -> None:
    """The complexity correction turns 'too simple' into a high score: PNG codes a blank frame in
    a few bits, the VAE still needs its usual code, so elbo-ic is far above the normal range."""
    blank = fitted.score(np.full((1, SIZE, SIZE), BACKGROUND, np.uint8))
    assert blank.score == "elbo-ic" and blank.guard is not None and blank.guard.score == "kl"
    assert blank.scores[0] > fitted.calibration_["elbo-ic"].max()
    assert fitted.decide(blank).flags[0] and fitted.decide(blank, tail="upper").flags[0]


def test_guard_combines_two_p_values_by_bonferroni(fitted: Detector) -> None:
    x = np.concatenate([disks(5, seed=31), crosses(5, seed=32)])
    both = fitted.score(x)
    alone = fitted.score(x, guard=None)
    kl = fitted.score(x, score="kl", guard=None)
    expected = np.minimum(1, 2 * np.minimum(fitted.decide(alone).p_values, fitted.decide(kl).p_values))
    np.testing.assert_allclose(fitted.decide(both).p_values, expected)
    assert fitted.smallest_p_value("elbo-ic", "two-sided", "kl") == 2 * fitted.smallest_p_value("elbo-ic")


def test_too_few_calibration_images_warn_with_the_number_needed(fitted: Detector) -> None:
    result = fitted.score(disks(3, seed=5))
    d = fitted.decide(result, fpr=0.0005, strict=True)
    assert any(str(calibration_needed(0.0005 / 2, "two-sided")) in w for w in d.warnings)  # guard: half each
    assert not d.flags.any() and d.threshold.alpha == 0.0005, "--strict-fpr: today's behaviour, nothing flagged"


def test_an_unreachable_rate_flags_at_the_floor_and_says_which_rate_holds(fitted: Detector) -> None:
    """400 calibration scores, two tests, two-sided: no p-value below 4/401, so --fpr 0.0005 becomes 4/401."""
    n = len(fitted.calibration_["elbo-ic"])
    anomalies = fitted.score(crosses(200, seed=6))
    d = fitted.decide(anomalies, fpr=0.0005)
    assert d.threshold.alpha == pytest.approx(4 / (n + 1)) == d.floor and d.threshold.requested == 0.0005
    assert d.flags.mean() > 0.5, "crosses lie beyond every calibration score"
    assert "smallest reachable level" in d.warnings[-1] and "--strict-fpr" in d.warnings[-1]
    assert d.guarantee.startswith(f"Each normal image is flagged with probability at most {4 / (n + 1):.4g}")
    assert "0.0005 asked for is below the smallest p-value" in d.guarantee
    assert "(the smallest reachable level; 0.0005 was asked for)" in d.threshold.describe()
    normal = fitted.decide(fitted.score(disks(2000, seed=7)), fpr=0.0005)
    # The rate that holds is 4/401 ~ 1.0%; 2000 held-out normals: mean 20, sd ~4.5 flags.
    assert normal.flags.mean() <= 4 / (n + 1) + 3 * np.sqrt(4 / (n + 1) / 2000)
    reachable = fitted.decide(anomalies, fpr=0.05)
    assert reachable.threshold.requested is None and reachable.threshold.alpha == 0.05, "nothing changes above it"


def test_unknown_tail_is_refused() -> None:
    with pytest.raises(ValueError, match="tail"):
        p_values(np.ones(3), np.ones(2), "lower")


def test_missing_guard_calibration_is_a_clear_error(fitted: Detector) -> None:
    import copy

    from vae_anomaly.errors import CalibrationError

    old = copy.copy(fitted)
    old.calibration_ = {k: v for k, v in fitted.calibration_.items() if k not in ("elbo-ic", "kl")}
    with pytest.raises(CalibrationError, match="--guard none"):
        old.decide(old.score(disks(2, seed=1)))
    assert old.decide(old.score(disks(2, seed=1), score="elbo", guard=None)).p_values.shape == (2,)


def test_samples_apply_to_the_score_and_the_guard_keeps_its_calibrated_count(fitted: Detector) -> None:
    r = fitted.score(disks(3, seed=2), score="recon-prob", samples=4)
    assert r.samples == 4 and r.guard is not None and r.guard.samples == fitted.default_samples("kl")


def test_fit_warns_when_the_default_decision_cannot_flag_at_one_percent() -> None:
    from vae_anomaly import FitConfig

    warnings: list[str] = []
    Detector(FitConfig(epochs=1, latent_dim=4, folds=1, calibration_fraction=0.3, device="cpu")).fit(
        disks(1000, seed=3), on_warning=warnings.append
    )
    assert any("300 calibration images" in w and "default decision" in w and "399" in w for w in warnings)
