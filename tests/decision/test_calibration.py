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
from vae_anomaly.decision.calibration import (
    Calibration,
    calibration_needed,
    combined_p_values,
    cross_conformal_p_values,
    p_values,
    smallest_p_value,
)
from vae_anomaly.decision.combination import MAX_EXCESS, Evidence, tail_size
from vae_anomaly.decision.rule import DecisionRule
from vae_anomaly.decision.thresholds import auto_threshold, flag


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


def _bag_statistic_by_brute_force(bag: np.ndarray, tails: Sequence[str]) -> np.ndarray:
    """T of every member of a bag (J, N), spelled out from the equations of `combination`: counts by
    comparing every pair, the tail above the (k+1)-th largest from the sorted bag, the truncated Cauchy sum."""
    n_stats, size = bag.shape
    best = np.zeros((n_stats, size))
    k = tail_size(size - 1)
    for j, tail in enumerate(tails):
        factor = 2.0 if tail == "two-sided" else 1.0
        for sign in {"two-sided": (1, -1), "upper": (1,), "lower": (-1,)}[tail]:
            v = sign * bag[j]
            e = np.log(size) - np.log((v[None, :] >= v[:, None]).sum(axis=1))
            if k:
                desc = np.sort(v)[::-1]
                u, distinct = desc[k], len(set(desc[1 : k + 1].tolist()))
                sigma = desc[:k].mean() - desc[k] if distinct > k / 3 else 0.0
                z = np.clip((v - u) / sigma, 0, MAX_EXCESS) if sigma > 0 else np.zeros(size)
                e = np.where(v > u, np.maximum(e, np.log(size / k) + z), e)
            best[j] = np.maximum(best[j], e - np.log(factor))
    p = np.exp(-best)  # tan((1/2 - p) pi) = cot(pi p), as the library computes it: sums that tie, tie alike
    with np.errstate(divide="ignore"):
        return np.where(p < 0.5, 1.0 / np.tan(np.pi * p), 0.0).sum(axis=0)


def _combined_by_brute_force(cal: np.ndarray, folds: np.ndarray, new: np.ndarray, tails: Sequence[str]) -> np.ndarray:
    """Full (cross-)conformal: for each new image and model, its bag with that model's calibration images."""
    n = cal.shape[1]
    out = np.ones(new.shape[-1])
    for k in range(new.shape[0]):
        for i in range(new.shape[-1]):
            t = _bag_statistic_by_brute_force(np.concatenate([cal, new[k, :, i, None]], axis=1), tails)
            out[i] += np.sum(t[:-1][folds == k] >= t[-1])
    return out / (n + 1)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(3, 45),
    m=st.integers(1, 12),
    k=st.integers(1, 3),
    seed=st.integers(0, 2**31),
    tails=st.lists(st.sampled_from(["upper", "two-sided", "lower"]), min_size=1, max_size=3),
    ties=st.booleans(),
)
def test_combined_p_values_are_the_full_conformal_p_values_of_the_bag(
    n: int, m: int, k: int, seed: int, tails: list[str], ties: bool
) -> None:
    """The fast count (bounds, and pairs compared only where they leave the order open) equals comparing
    every member with every new image in its own bag; heavy tails, ties, cross-fitted models included."""
    rng = np.random.default_rng(seed)
    cal = rng.standard_t(3, (len(tails), n))
    new = rng.standard_t(3, (k, len(tails), m)) * rng.choice([1.0, 6.0], (k, len(tails), m))
    if ties:
        cal, new = np.round(cal), np.round(new)  # many equal values, new ones equal to calibration ones
    folds = np.arange(n) % k
    got = combined_p_values(cal, folds, new, tails)
    np.testing.assert_allclose(got, _combined_by_brute_force(cal, folds, new, tails))


def test_one_statistic_on_the_upper_tail_is_the_plain_conformal_p_value_below_one_half() -> None:
    """Above 1/2 a statistic adds no evidence (the truncated Cauchy sum): those images all get p = 1."""
    rng = np.random.default_rng(3)
    cal, new = rng.standard_normal(50), rng.standard_normal(30) * 2
    got = combined_p_values(cal[None], np.zeros(50, np.int64), new[None, None], "upper")
    plain = p_values(cal, new, "upper")
    below = plain < 0.5
    assert below.sum() > 5 and (~below).sum() > 5
    np.testing.assert_allclose(got[below], plain[below])
    assert np.all(got[~below] == 1.0)


def _normal_statistics(rng: np.random.Generator, size: int) -> np.ndarray:
    """Five statistics of `size` exchangeable normal images, dependent, with heavy, light and discrete tails."""
    z = rng.standard_normal((5, size))
    return np.stack(
        [
            np.exp(z[0]),  # skewed, like -ELBO
            0.7 * z[0] + 0.7 * rng.standard_t(1.5, size),  # heavy-tailed, dependent on the first
            rng.uniform(0, 1, size),  # bounded, light
            np.round(z[3] * 2),  # discrete: many ties
            np.abs(z[4]) ** 3,  # one-sided, heavy
        ]
    )


@pytest.mark.parametrize("n", [50, 100, 300, 1000])
def test_normal_images_are_flagged_at_most_at_the_stated_rate(n: int) -> None:
    """The guarantee: exchangeable normals, P(p <= a) = floor(a (n+1)) / (n+1), whatever the statistics'
    tails and dependence; 300 calibrations x 100 new images each, within four standard errors."""
    rng = np.random.default_rng(n)
    tails = ["two-sided", "upper", "two-sided", "lower", "upper"]
    hits = {a: 0 for a in (1 / (n + 1), 0.01, 0.05)}
    reps, m = 300, 100
    for _ in range(reps):
        z = _normal_statistics(rng, n + m)
        p = combined_p_values(z[:, :n], np.zeros(n, np.int64), z[None, :, n:], tails)
        for a in hits:
            hits[a] += int(np.sum(p <= a + 1e-12))
    for a, count in hits.items():
        expected = math.floor(a * (n + 1) + 1e-9) / (n + 1)
        # Images sharing a calibration are correlated: the sd of the mean rate is about sqrt(e(1-e)/(n reps)).
        sd = math.sqrt(expected * (1 - expected) * (1 / (reps * m) + 1 / ((n + 2) * reps)))
        assert count / (reps * m) <= expected + 4 * sd, (a, count / (reps * m), expected)
        assert count / (reps * m) >= expected - 4 * sd, (a, count / (reps * m), expected)


def test_an_image_beyond_every_normal_one_on_several_statistics_outranks_one_extreme_on_one() -> None:
    """The issue's black image: beyond every normal image on five statistics at once ranks ahead of every
    normal image, though a handful of those are each the most extreme of some statistic."""
    rng = np.random.default_rng(7)
    cal = rng.standard_normal((15, 300))
    black = np.zeros(15)
    black[:5] = -4.0  # just beyond the lowest of 300 normals (about -2.9) on five statistics
    p = combined_p_values(cal, np.zeros(300, np.int64), black[None, :, None], "two-sided")
    assert p[0] == pytest.approx(1 / 301)


def test_ten_times_further_counts_more_than_just_beyond() -> None:
    """On one statistic, two images beyond every normal one: the far one has much the larger evidence,
    and only the far one outranks a normal image that is the most extreme on both statistics."""
    rng = np.random.default_rng(8)
    cal = rng.standard_normal((2, 300))
    cal[:, 0] = [3.5, 3.5]  # one normal image beyond the others on both statistics
    new = np.array([[3.6, 30.0], [0.0, 0.0]])
    evidence = Evidence.of(cal, ["upper", "upper"])
    near, far = evidence.per_statistic(new)[0]  # -log p of the first statistic
    assert far > near + 5
    p = combined_p_values(cal, np.zeros(300, np.int64), new[None], "upper")
    assert p[1] == pytest.approx(1 / 301) and p[0] == pytest.approx(2 / 301)


def test_an_image_atypical_in_the_guard_alone_reaches_the_floor() -> None:
    rng = np.random.default_rng(0)
    cal = rng.standard_normal((2, 99))
    new = np.array([[0.0, 0.0, 9.0], [0.0, -9.0, 0.0]])  # typical; kl far too low; score far too high
    p = combined_p_values(cal, np.zeros(99, np.int64), new[None], "two-sided")
    assert p[0] > 0.5 and p[1] == p[2] == pytest.approx(1 / 100)


def test_one_model_per_fold_sums_the_folds_counts_like_cross_conformal() -> None:
    """With one statistic on the upper tail, the combined p-value of K models is the cross-conformal one
    (for images above the median under every model: below it a statistic adds no evidence)."""
    rng = np.random.default_rng(1)
    cal, folds = rng.standard_normal(60), np.arange(60) % 3
    model_scores = rng.standard_normal((3, 40)) * 1.5 + 1.0
    got = combined_p_values(cal[None], folds, model_scores[:, None], "upper")
    above = model_scores.min(axis=0) > np.median(cal) + 0.1
    assert above.sum() >= 10
    np.testing.assert_allclose(got[above], cross_conformal_p_values(cal, folds, model_scores, "upper")[above])


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
    by_p = flag(s, combined_p_values(c[None], np.zeros(len(c), np.int64), s[None, None], tail), thr)
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
    exact = combined_p_values(cal, np.zeros(cal.shape[1], np.int64), scores, "two-sided")
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


def test_below_the_floor_the_fpr_rule_flags_at_the_floor_and_says_so_plainly(fitted: Detector) -> None:
    """400 calibration scores: no image can be flagged at 0.05%; the rule flags at 1/401 and says so once."""
    n = len(fitted.calibration_["elbo-ic"])
    anomalies = fitted.score(crosses(200, seed=6))
    d = fitted.decide(anomalies, fpr=0.0005)
    assert d.threshold.alpha == pytest.approx(1 / (n + 1)) == d.floor and d.threshold.requested == 0.0005
    assert d.threshold.tail_model is None and d.flags.mean() > 0.5, "crosses lie beyond every calibration image"
    assert [w for w in d.warnings if "no image can be flagged" in w] == [
        f"with {n} normal calibration images no image can be flagged at 0.05%; flagging at 0.25%, the smallest "
        "rate these images allow. To flag at 0.05%, re-fit with more normal images, a larger "
        "--calibration-fraction or --folds 5 (at least 1999); --strict-fpr flags nothing instead."
    ]
    assert d.guarantee.startswith("Each normal image is flagged with probability at most 0.002494 (exact, conformal)")
    strict = fitted.decide(anomalies, fpr=0.0005, strict=True)
    assert not strict.flags.any() and strict.threshold.tail_model is None, "--strict-fpr: exact p-values only"
    reachable = fitted.decide(anomalies, fpr=0.05)
    assert reachable.threshold.tail_model is None and reachable.threshold.alpha == 0.05, "nothing changes above it"
    assert "exact, conformal" in reachable.guarantee


def test_below_the_floor_benjamini_hochberg_reads_the_tail_model_and_says_it_is_approximate(fitted: Detector) -> None:
    """BH over a CI batch of 200 needs p <= 0.05/200 for its first flag, below 1/401: the tail model's p-values."""
    n = len(fitted.calibration_["elbo-ic"])
    batch = fitted.score(np.concatenate([disks(190, seed=7), crosses(10, seed=6)]))
    d = fitted.decide(batch, fdr=0.05)
    assert d.threshold.alpha == 0.05 and d.threshold.tail_model is not None and d.threshold.tail_model["n"] == n
    assert d.flags[-10:].mean() >= 0.5 and d.flags[:190].sum() <= 1, "the crosses, hardly any disc"
    assert "approximate: tail model" in d.guarantee and "generalised Pareto tail model" in d.threshold.describe()


def test_with_too_few_for_a_tail_model_the_rule_flags_at_its_floor_and_says_which_rate_holds() -> None:
    """15 calibration scores: no tail model (20 needed), so --fpr 0.01 becomes the floor 1/16."""
    rng = np.random.default_rng(0)
    calibration = Calibration({"elbo": rng.normal(size=15)})
    rule = DecisionRule("elbo", guard=None, fpr=0.01)
    scores = np.array([0.0, 9.0])
    d = rule.decision(scores, rule.p_values(calibration, scores), calibration)
    assert d.threshold.alpha == pytest.approx(1 / 16) == d.floor and d.threshold.requested == 0.01
    assert d.flags.tolist() == [False, True] and d.threshold.tail_model is None
    assert "flagging at 6.2%, the smallest rate these images allow" in (rule.unreachable(15) or "")
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


def test_the_tail_model_is_fitted_only_where_an_image_reaches_the_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fitting it imports SciPy (about half a second of every `score`); typical batches never need it."""
    rng = np.random.default_rng(4)
    calibration = Calibration({"elbo-ic": rng.standard_normal(300), "kl": rng.standard_normal(300)}, np.zeros(300), 1)
    fitted: list[tuple[str, ...]] = []
    original = Calibration.tail_model

    def counting(
        self: Calibration, names: Sequence[str], tail: str = "two-sided", weights: Sequence[float] | None = None
    ) -> object:
        fitted.append(tuple(names))
        return original(self, names, tail, weights)

    monkeypatch.setattr(Calibration, "tail_model", counting)
    typical = [rng.standard_normal(50) * 0.5, rng.standard_normal(50) * 0.5]
    p = calibration.p_values(["elbo-ic", "kl"], typical, [None, None])
    assert p.min() > 1 / 301 and fitted == []
    far = [np.r_[typical[0], 9.0], np.r_[typical[1], 0.0]]
    p = calibration.p_values(["elbo-ic", "kl"], far, [None, None])
    assert p[-1] < 1 / 301 and fitted == [("elbo-ic", "kl")]


def test_a_discrete_statistic_has_no_tail_and_a_continuous_one_far_out_does() -> None:
    """The darkest grey level of 100 images takes a handful of values: one level beyond the top is the one
    member beyond a tie, p = 1/(n+1), no smaller; a continuous statistic far out gets the tail's smaller p."""
    rng = np.random.default_rng(2)
    levels = rng.choice([0.0, 1.0, 2.0, 3.0, 4.0], 100, p=[0.6, 0.2, 0.1, 0.06, 0.04])
    one_level, far = Evidence.of(levels[None], ["upper"]).per_statistic(np.array([[5.0, 50.0]]))[0]
    assert one_level == far == pytest.approx(np.log(101)), "(1) alone: beyond all, as likely as any member"
    smooth = rng.standard_normal(100)
    near, far = Evidence.of(smooth[None], ["upper"]).per_statistic(np.array([[smooth.max() + 0.01, 50.0]]))[0]
    assert near == pytest.approx(np.log(101), abs=0.5) and far > near + 3 and far < np.log(101) + tail_size(100)


def test_a_statistics_weight_counts_as_that_many_copies_of_it() -> None:
    """(3) with integer weights is the sum over repeated statistics: p-values, T and bounds agree."""
    from vae_anomaly.decision import combination

    rng = np.random.default_rng(7)
    cal = rng.standard_t(3, size=(3, 60))
    new = rng.standard_t(3, size=(1, 3, 25)) * 1.5
    tails = ["upper", "two-sided", "lower"]
    weighted = combination.p_values(cal, np.zeros(60, np.int64), new, tails, weights=[3.0, 1.0, 1.0])
    copies = combination.p_values(
        cal[[0, 0, 0, 1, 2]], np.zeros(60, np.int64), new[:, [0, 0, 0, 1, 2]], ["upper"] * 3 + tails[1:]
    )
    np.testing.assert_allclose(weighted[0], copies[0])
    np.testing.assert_allclose(weighted[1], copies[1])
    plain = combination.p_values(cal, np.zeros(60, np.int64), new, tails)
    assert not np.allclose(plain[1], weighted[1])
    with pytest.raises(ValueError, match="weights must be 3 positive numbers"):
        Evidence.of(cal, tails, [1.0, 0.0, 1.0])


def test_a_backbone_models_score_is_upper_tailed_and_weighs_more_the_more_images_calibrate_it() -> None:
    """The rule's defaults follow what the model models (features.py): pixels keep the two-sided,
    equally weighted test; a backbone model's score weighs one per SCORE_WEIGHT_PER calibration images,
    from 1 up to as much as the rest together; an explicit --tail wins."""
    from vae_anomaly.decision.calibration import Calibration
    from vae_anomaly.model.features import SCORE_WEIGHT_PER, weights

    rng = np.random.default_rng(3)
    scores = {"elbo-ic-nn": rng.normal(size=50), "kl": rng.normal(size=50), "property:brightness": rng.normal(size=50)}
    sides = {"brightness": "two-sided"}
    pixels = Calibration(scores, np.zeros(50, np.int64), 1, sides)
    backbone = Calibration(scores, np.zeros(50, np.int64), 1, sides, "backbone")
    rule = DecisionRule()
    stats = rule.statistics_in(backbone)
    assert rule.tails_for(stats, pixels) == ("two-sided", "two-sided", "two-sided")
    assert rule.tails_for(stats, backbone) == ("upper", "upper", "two-sided")
    assert rule.weights_for(stats, pixels) is None
    assert rule.weights_for(stats, backbone) == (1.0, 1.0, 1.0), "50 calibration images: the score weighs as one"
    assert weights("backbone", 16, 3 * SCORE_WEIGHT_PER) == (3.0,) + (1.0,) * 15
    assert weights("backbone", 16, 100 * SCORE_WEIGHT_PER) == (15.0,) + (1.0,) * 15, "at most all the others"
    assert weights("pixels", 16, 10_000) is None
    assert DecisionRule(tail="two-sided").tails_for(stats, backbone)[0] == "two-sided"
    assert rule.resolved("backbone").tail == "upper" and rule.resolved("pixels").tail == "two-sided"
