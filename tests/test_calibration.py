"""Conformal p-values, the auto threshold, and their error rates."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conftest import BACKGROUND, SIZE, crosses, disks
from vae_anomaly import Detector
from vae_anomaly.calibration import (
    Calibration,
    _ranks,
    bag_quantiles,
    calibration_needed,
    cross_conformal_p_values,
    deviation,
    p_values,
    smallest_p_value,
    typicality_p_values,
)
from vae_anomaly.decision import DecisionRule
from vae_anomaly.thresholds import auto_threshold, flag


def test_p_values_follow_the_conformal_formulas() -> None:
    cal = np.array([1.0, 2.0, 3.0, 4.0])
    s = np.array([0.5, 2.0, 5.0])
    np.testing.assert_allclose(p_values(cal, s, "upper"), [5 / 5, 4 / 5, 1 / 5])
    # p_low = (1 + #{<= s}) / 5 = 1/5, 3/5, 5/5; two-sided = min(1, 2 * min(high, low)).
    np.testing.assert_allclose(p_values(cal, s, "two-sided"), [2 / 5, 1.0, 2 / 5])


def test_smallest_reachable_p_value_and_calibration_needed_agree() -> None:
    for alpha in (0.1, 0.05, 0.01, 0.003):
        n = calibration_needed(alpha)
        assert smallest_p_value(n) <= alpha + 1e-12
        assert smallest_p_value(n - 1) > alpha
    assert calibration_needed(0.01) == 99, "one test: 99 calibration images reach 1%"


def _typicality_by_brute_force(cal: np.ndarray, new: np.ndarray, tail: str) -> np.ndarray:
    """Full conformal, spelled out: for each new image, every bag member's rank from the nearer end of
    each statistic and its largest deviation (bag percentiles by sorting the bag), and the share of the
    bag at least as atypical."""
    n = cal.shape[1]
    out = []
    for x in new.T:
        bag = np.concatenate([cal, x[:, None]], axis=1)  # (J, n + 1)
        srt = np.sort(bag, axis=1)
        r = np.clip(np.round(np.array([0.05, 0.25, 0.5, 0.75, 0.95]) * n).astype(int), 1, max(n - 1, 1))
        q05, q1, m, q3, q95 = (srt[:, i][:, None] for i in r)
        tiny = 1e-9 * np.maximum(1.0, np.abs(m))
        outer = 1.6449 / 0.6745  # a side whose quartile is its median: the outer percentile, in the same units
        high = np.where(q3 > m, q3 - m, np.where(q95 > m, (q95 - m) / outer, tiny))
        low = np.where(q1 < m, m - q1, np.where(q05 < m, (m - q05) / outer, tiny))
        up = (bag - m) / high
        down = (m - bag) / low
        dev = up if tail == "upper" else np.where(bag >= m, up, down)
        d = dev.max(axis=0)
        rank_up = (bag[:, None, :] >= bag[:, :, None]).sum(axis=2)  # (J, n + 1): members >= each
        rank_down = (bag[:, None, :] <= bag[:, :, None]).sum(axis=2)
        rho = (rank_up if tail == "upper" else np.minimum(rank_up, rank_down)).min(axis=0)
        ahead = (rho < rho[-1]) | ((rho == rho[-1]) & (d >= d[-1]))
        out.append(np.sum(ahead) / (n + 1))
    return np.array(out)


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(4, 40),
    m=st.integers(1, 20),
    seed=st.integers(0, 2**31),
    tail=st.sampled_from(["upper", "two-sided"]),
    ties=st.booleans(),
)
def test_typicality_p_values_are_the_full_conformal_p_values_of_the_bag(
    n: int, m: int, seed: int, tail: str, ties: bool
) -> None:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((2, n + m))
    if ties:
        z = np.round(z * 2) / 2  # many equal scores, new ones equal to calibration ones
    cal, new = z[:, :n], z[:, n:]
    got = typicality_p_values(cal, np.zeros(n, np.int64), new[None], tail)
    np.testing.assert_allclose(got, _typicality_by_brute_force(cal, new, tail))


def test_one_statistic_on_the_upper_tail_is_the_plain_conformal_p_value() -> None:
    rng = np.random.default_rng(3)
    cal, new = rng.standard_normal(50), rng.standard_normal(30) * 2
    got = typicality_p_values(cal[None], np.zeros(50, np.int64), new[None, None], "upper")
    np.testing.assert_allclose(got, p_values(cal, new, "upper"))


@pytest.mark.parametrize("n", [30, 99, 400])
def test_two_dependent_skewed_statistics_give_one_exact_test_at_floor_one_over_n_plus_one(n: int) -> None:
    """Exchangeable normal data: P(p <= a) = floor(a (n+1)) / (n+1), whatever the dependence of the
    statistics and however skewed; 600 calibrations x 100 new images each, a few sd either way."""
    rng = np.random.default_rng(n)
    hits = {a: 0 for a in (1 / (n + 1), 0.05)}
    reps, m = 600, 100
    for _ in range(reps):
        z = rng.standard_normal((2, n + m))
        z[1] = 0.7 * z[0] + 0.7 * z[1]
        z[0] = np.exp(z[0])
        p = typicality_p_values(z[:, :n], np.zeros(n, np.int64), z[None, :, n:], "two-sided")
        for a in hits:
            hits[a] += int(np.sum(p <= a + 1e-12))
    for a, count in hits.items():
        expected = math.floor(a * (n + 1) + 1e-9) / (n + 1)
        # Images sharing a calibration are correlated: the sd of the mean rate is about sqrt(e(1-e)/(n reps)).
        sd = math.sqrt(expected * (1 - expected) * (1 / (reps * m) + 1 / ((n + 2) * reps)))
        assert abs(count / (reps * m) - expected) <= 4 * sd, (a, count / (reps * m), expected)


def test_an_image_atypical_in_the_guard_alone_reaches_the_floor() -> None:
    rng = np.random.default_rng(0)
    cal = rng.standard_normal((2, 99))
    new = np.array([[0.0, 0.0, 9.0], [0.0, -9.0, 0.0]])  # typical; kl far too low; score far too high
    p = typicality_p_values(cal, np.zeros(99, np.int64), new[None], "two-sided")
    assert p[0] > 0.5 and p[1] == p[2] == pytest.approx(1 / 100)


def test_one_model_per_fold_sums_the_folds_counts_like_cross_conformal() -> None:
    """With one statistic on the upper tail, the typicality p-value of K models is the cross-conformal one."""
    rng = np.random.default_rng(1)
    cal, folds = rng.standard_normal(60), np.arange(60) % 3
    model_scores = rng.standard_normal((3, 25)) * 1.5
    got = typicality_p_values(cal[None], folds, model_scores[:, None], "upper")
    np.testing.assert_allclose(got, cross_conformal_p_values(cal, folds, model_scores, "upper"))


@settings(max_examples=200, deadline=None)
@given(
    cal=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=60),
    new=st.lists(st.floats(-1.2e3, 1.2e3, allow_nan=False), min_size=1, max_size=30),
    alpha=st.floats(0.01, 0.2),
    tail=st.sampled_from(["upper", "two-sided"]),
)
# Found by hypothesis: the bound lies just past a deviation crossing near 0, where a score's own
# ulps are too small to move a deviation near 1.
@example(cal=[0.0, 0.0, 0.0, 1.0, 117.0, 117.0, 119.0], new=[0.0, -1.0], alpha=0.125, tail="two-sided")
def test_auto_score_bounds_flag_exactly_the_images_with_p_at_most_alpha(
    cal: list[float], new: list[float], alpha: float, tail: str
) -> None:
    c, s = np.array(cal), np.array(new)
    thr = auto_threshold(c[None], alpha, tail)
    by_p = flag(s, typicality_p_values(c[None], np.zeros(len(c), np.int64), s[None, None], tail), thr)
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
    assert fitted.decide(blank, checks=False).flags[0], "a blank frame is too simple to be normal"
    assert not fitted.decide(blank, tail="upper", checks=False).flags[0], "the upper tail alone cannot see it"
    assert fitted.decide(blank, tail="upper").flags[0], "its properties (contrast, information) can"


def test_default_score_and_guard_flag_a_blank_frame_on_either_tail(fitted: Detector) -> None:
    """The complexity correction turns 'too simple' into a high score: PNG codes a blank frame in
    a few bits, the VAE still needs its usual code, so elbo-ic is far above the normal range."""
    blank = fitted.score(np.full((1, SIZE, SIZE), BACKGROUND, np.uint8))
    assert blank.score == "elbo-ic-nn" and blank.guard is not None and blank.guard.score == "kl"
    assert blank.scores[0] > fitted.calibration_["elbo-ic-nn"].max()
    assert fitted.decide(blank).flags[0] and fitted.decide(blank, tail="upper").flags[0]


def test_guard_and_score_are_one_test_with_the_floor_of_one(fitted: Detector) -> None:
    x = np.concatenate([disks(5, seed=31), crosses(5, seed=32)])
    both = fitted.score(x)
    assert both.guard is not None
    cal = np.stack([fitted.calibration_[both.score], fitted.calibration_["kl"]])
    scores = np.stack([both.scores, both.guard.scores])[None]
    exact = typicality_p_values(cal, np.zeros(cal.shape[1], np.int64), scores, "two-sided")
    n = cal.shape[1]
    assert fitted.smallest_p_value("elbo-ic") == pytest.approx(1 / (n + 1))
    assert exact[5:].max() == pytest.approx(1 / (n + 1)), "crosses lie beyond every calibration image"
    d = fitted.decide(both, checks=False)
    np.testing.assert_allclose(d.p_values[:5], exact[:5])
    strict = fitted.decide(both, strict=True, checks=False)
    np.testing.assert_allclose(strict.p_values, exact)


def test_too_few_calibration_images_warn_with_the_number_needed(fitted: Detector) -> None:
    result = fitted.score(disks(3, seed=5))
    d = fitted.decide(result, fpr=0.0005, strict=True)
    assert any(str(calibration_needed(0.0005)) in w for w in d.warnings)
    assert not d.flags.any() and d.threshold.alpha == 0.0005, "--strict-fpr: today's behaviour, nothing flagged"


def test_below_the_floor_the_tail_model_flags_at_the_rate_asked_and_says_it_is_approximate(fitted: Detector) -> None:
    """400 calibration scores: exact p-values stop at 1/401; --fpr 0.0005 is decided on the tail model's."""
    n = len(fitted.calibration_["elbo-ic"])
    anomalies = fitted.score(crosses(200, seed=6))
    d = fitted.decide(anomalies, fpr=0.0005)
    assert d.threshold.alpha == 0.0005 and d.threshold.requested is None and d.floor == pytest.approx(1 / (n + 1))
    assert d.threshold.tail_model is not None and d.threshold.tail_model["n"] == n
    assert d.flags.mean() > 0.5, "crosses lie far beyond every calibration score"
    assert "tail model" in d.warnings[-1] and "--strict-fpr" in d.warnings[-1]
    assert d.guarantee.startswith(
        f"Each normal image is flagged with probability at most about 0.0005 (approximate: tail model, n = {n};"
    )
    assert "generalised Pareto tail model" in d.threshold.describe()
    normal = fitted.decide(fitted.score(disks(2000, seed=7)), fpr=0.0005)
    # 2000 held-out normals at 0.05%: mean 1 flag; allow 3 sd of the rate the tail model claims and 1/n.
    assert normal.flags.mean() <= 0.0005 + 3 * np.sqrt(0.0005 / 2000) + 1 / n
    strict = fitted.decide(anomalies, fpr=0.0005, strict=True)
    assert not strict.flags.any() and strict.threshold.tail_model is None, "--strict-fpr: exact p-values only"
    reachable = fitted.decide(anomalies, fpr=0.05)
    assert reachable.threshold.tail_model is None and reachable.threshold.alpha == 0.05, "nothing changes above it"
    assert "exact, conformal" in reachable.guarantee


def test_with_too_few_for_a_tail_model_the_rule_flags_at_its_floor_and_says_which_rate_holds() -> None:
    """15 calibration scores: no tail model (20 needed), so --fpr 0.01 becomes the floor 1/16."""
    rng = np.random.default_rng(0)
    calibration = Calibration({"elbo": rng.normal(size=15)})
    rule = DecisionRule("elbo", guard=None, fpr=0.01)
    scores = np.array([0.0, 9.0])
    d = rule.decision(scores, rule.p_values(calibration, scores), calibration)
    assert d.threshold.alpha == pytest.approx(1 / 16) == d.floor and d.threshold.requested == 0.01
    assert d.flags.tolist() == [False, True] and d.threshold.tail_model is None
    assert "smallest reachable level" in (rule.unreachable(15) or "")
    assert d.guarantee.startswith("Each normal image is flagged with probability at most 0.0625 (exact, conformal)")
    assert "0.01 asked for is below the smallest p-value" in d.guarantee
    assert "(the smallest reachable level; 0.01 was asked for)" in d.threshold.describe()


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
    Detector(FitConfig(epochs=1, latent_dim=4, folds=1, calibration_fraction=0.05, device="cpu")).fit(
        disks(1000, seed=3), on_warning=warnings.append
    )
    assert any("50 calibration images" in w and "default decision" in w and "99" in w for w in warnings)


def _typicality_pairwise(cal: np.ndarray, folds: np.ndarray, scores: np.ndarray, tail: str) -> np.ndarray:
    """The previous implementation: every new image against every member of its model's fold, O(m n)."""
    n_stats, n = cal.shape
    own = np.stack([_ranks(c, c, tail) for c in cal])
    count = np.zeros(scores.shape[-1])
    for k in range(scores.shape[0]):
        in_fold = folds == k
        c_k, own_k, x = cal[:, in_fold], own[:, :, in_fold], scores[k]
        rho_x = np.min([_ranks(cal[j], x[j], tail) for j in range(n_stats)], axis=(0, 1)) + 1
        rho = np.full((x.shape[1], c_k.shape[1]), np.iinfo(np.int64).max)
        d, d_x = np.full(rho.shape, -np.inf), np.full(x.shape[1], -np.inf)
        for j in range(n_stats):
            pushed = [x[j][:, None] >= c_k[j][None], x[j][:, None] <= c_k[j][None]]
            for side in range(own.shape[1]):
                rho = np.minimum(rho, own_k[j, side][None] + pushed[side])
            q = bag_quantiles(cal[j], x[j])
            d = np.maximum(d, deviation(c_k[j][None], q[:, None], tail))
            d_x = np.maximum(d_x, deviation(x[j], q, tail))
        ahead = (rho < rho_x[:, None]) | ((rho == rho_x[:, None]) & (d >= d_x[:, None]))
        count += ahead.sum(axis=1)
    return (1.0 + count) / (n + 1.0)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(6, 60),
    m=st.integers(1, 30),
    k=st.integers(1, 5),
    seed=st.integers(0, 2**31),
    tail=st.sampled_from(["upper", "two-sided"]),
    ties=st.booleans(),
)
def test_the_fast_count_equals_comparing_every_image_with_every_member(
    n: int, m: int, k: int, seed: int, tail: str, ties: bool
) -> None:
    """Only members within one rank of the new image's need comparing; cross-fitted models and ties included."""
    rng = np.random.default_rng(seed)
    cal, scores = rng.standard_normal((2, n)), rng.standard_normal((k, 2, m)) * 1.5
    if ties:
        cal, scores = np.round(cal * 2) / 2, np.round(scores * 2) / 2
    folds = np.arange(n) % k
    got = typicality_p_values(cal, folds, scores, tail)
    np.testing.assert_allclose(got, _typicality_pairwise(cal, folds, scores, tail))


def test_the_tail_model_is_fitted_only_where_an_image_reaches_the_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fitting it imports SciPy (about half a second of every `score`); typical batches never need it."""
    rng = np.random.default_rng(4)
    calibration = Calibration({"elbo-ic": rng.standard_normal(300), "kl": rng.standard_normal(300)}, np.zeros(300), 1)
    fitted: list[tuple[str, ...]] = []
    original = Calibration.tail_model

    def counting(self: Calibration, names: Sequence[str], tail: str = "two-sided") -> object:
        fitted.append(tuple(names))
        return original(self, names, tail)

    monkeypatch.setattr(Calibration, "tail_model", counting)
    typical = [rng.standard_normal(50) * 0.5, rng.standard_normal(50) * 0.5]
    p = calibration.p_values(["elbo-ic", "kl"], typical, [None, None])
    assert p.min() > 1 / 301 and fitted == []
    far = [np.r_[typical[0], 9.0], np.r_[typical[1], 0.0]]
    p = calibration.p_values(["elbo-ic", "kl"], far, [None, None])
    assert p[-1] < 1 / 301 and fitted == [("elbo-ic", "kl")]


def test_a_discrete_statistic_is_scaled_by_its_outer_percentile_where_a_quartile_is_its_median() -> None:
    """60 of 100 slide tiles share one 99th-percentile grey level: a tile one level brighter is not
    a billion half-IQRs out (it would outrank every real anomaly in the one test); a constant one is."""
    cal = np.r_[np.full(60, 229.0), np.linspace(210, 228, 20), np.linspace(230, 240, 20)]
    from vae_anomaly.calibration import deviation

    d = deviation(np.array([230.0, 300.0]), bag_quantiles(cal, np.array([230.0, 300.0])), "two-sided")
    assert 0 < d[0] < 1 and 10 < d[1] < 100
    constant = np.full(100, 256.0)
    assert deviation(np.array([257.0]), bag_quantiles(constant, np.array([257.0])), "two-sided")[0] > 1e6
