"""Batch-level decisions: Benjamini-Hochberg, the shift and count tests, the gate's error rates.

Pure numpy and SciPy on simulated scores: no model is trained here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from vae_anomaly.decision.batch_tests import exceedance_test, shift_test
from vae_anomaly.decision.calibration import combined_p_values, cross_conformal_p_values, p_values
from vae_anomaly.decision.gate import GateRule, evaluate_gate, parse_gate
from vae_anomaly.decision.thresholds import benjamini_hochberg
from vae_anomaly.errors import GateSpecError
from vae_anomaly.reports.ci import github_escape_data, github_escape_property


def bh_reference(p: list[float], q: float) -> list[bool]:
    """Benjamini & Hochberg (1995), step up, written out the long way."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    k = 0
    for rank, i in enumerate(order, start=1):
        if p[i] <= rank * q / m:
            k = rank
    flagged = set(order[:k])
    return [i in flagged for i in range(m)]


def test_bh_on_a_known_example() -> None:
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.2, 0.5])
    # sorted: .005 .01 .03 .04 .2 .5 vs i*0.05/6 = .0083 .0167 .025 .0333 .0417 .05 -> k = 2
    flags, cutoff = benjamini_hochberg(p, 0.05)
    assert flags.tolist() == [True, False, False, True, False, False] and cutoff == 0.01


@pytest.mark.parametrize("seed", range(30))
def test_bh_matches_a_direct_implementation_and_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, 80))
    # A mix of nulls, signals and exact ties, as conformal p-values have.
    p = np.where(rng.random(m) < 0.3, rng.random(m) * 0.01, rng.random(m))
    p = np.round(p, int(rng.integers(2, 6)))
    q = float(rng.choice([0.01, 0.05, 0.1, 0.2]))
    flags, _ = benjamini_hochberg(p, q)
    assert flags.tolist() == bh_reference(p.tolist(), q)


def test_bh_flags_nothing_without_evidence_and_refuses_bad_levels() -> None:
    assert benjamini_hochberg(np.array([0.5, 0.9]), 0.1) == (pytest.approx([False, False]), None)
    assert benjamini_hochberg(np.zeros(0), 0.1)[1] is None
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        benjamini_hochberg(np.array([0.1]), 1.5)


def test_shift_test_is_scipys_mann_whitney() -> None:
    rng = np.random.default_rng(0)
    cal, batch = rng.normal(size=300), rng.normal(0.2, 1, size=80)
    t = shift_test(batch, cal)
    ref = stats.mannwhitneyu(batch, cal, alternative="greater")
    assert t.statistic == float(ref.statistic) and t.p_value == float(ref.pvalue)
    assert shift_test(np.zeros(0), cal).p_value == 1.0


def test_count_test_is_scipys_beta_binomial_and_reports_the_binomial() -> None:
    n, m, a, k = 400, 200, 0.01, 6
    t = exceedance_test(k, m, n, a)
    j = math.floor(a * (n + 1))  # calibration gaps beyond the cut-off of the rule's one test
    assert t.p_value == pytest.approx(stats.betabinom.sf(k - 1, m, j, n + 1 - j), rel=1e-12)
    assert f"plain binomial p = {stats.binomtest(k, m, a, alternative='greater').pvalue:.3g}" in t.detail
    assert exceedance_test(3, 50, 98, 0.01).p_value == 1.0, "98 scores cannot reach 1%"
    assert exceedance_test(3, 50, 99, 0.01).p_value < 1.0, "99 can"


def _simulate(rng: np.random.Generator, n: int, m: int, anomalies: int, rules: list[GateRule], a: float) -> bool:
    """One batch through the gate; True when it fails. Normal scores ~ N(0, 1), anomalies ~ N(4, 1)."""
    cal = rng.normal(size=n)
    batch = np.concatenate([rng.normal(size=m - anomalies), rng.normal(4.0, 1.0, size=anomalies)])
    p = combined_p_values(cal[None], np.zeros(n, np.int64), batch[None, None], "two-sided")
    flagged = int((p <= a).sum())
    tests = {"shift": shift_test(batch, cal), "binomial": exceedance_test(flagged, m, n, a)}
    return not all(c.passed for c in evaluate_gate(rules, flagged, m, tests))


# 2000 batches: the observed false-fail rate of a gate at level L must stay below
# L + 3.09 sd (sd = sqrt(L (1 - L) / 2000)), the one-sided 99.9% binomial bound,
# so this test fails by chance once in a thousand runs at most (it is seeded anyway).
BATCHES = 2000


def _bound(level: float) -> float:
    return level + 3.09 * math.sqrt(level * (1 - level) / BATCHES)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rules", "level"),
    [
        ([GateRule("shift-p", 0.01)], 0.01),
        ([GateRule("binom-p", 0.01)], 0.01),
        ([GateRule("shift-p", 0.005), GateRule("binom-p", 0.005)], 0.01),  # union bound: levels add up
    ],
)
def test_gate_false_fail_rate_on_normal_batches_stays_at_its_level(rules: list[GateRule], level: float) -> None:
    """A fresh calibration set per batch: the guarantee is over calibration and batch alike."""
    rng = np.random.default_rng(7)
    fails = sum(_simulate(rng, 400, 200, 0, rules, 0.01) for _ in range(BATCHES))
    assert fails / BATCHES <= _bound(level), (fails, rules)


def test_gate_fails_batches_with_five_percent_anomalies() -> None:
    rng = np.random.default_rng(8)
    rules = [GateRule("shift-p", 0.005), GateRule("binom-p", 0.005)]
    fails = sum(_simulate(rng, 400, 400, 20, rules, 0.01) for _ in range(300))
    assert fails / 300 >= 0.95


def test_plain_binomial_test_would_fail_too_many_normal_batches() -> None:
    """Why binom-p uses the beta-binomial: one calibration set makes a batch's flags co-vary.

    Exact, no simulation: the count of a normal batch is beta-binomial (400
    calibration scores, 200 images, 1%); sum its probabilities over
    the counts each test would fail at level 1%.
    """
    n, m, a = 400, 200, 0.01
    j = math.floor(a * (n + 1))
    law = stats.betabinom(m, j, n + 1 - j)
    counts = np.arange(m + 1)
    naive = sum(law.pmf(k) for k in counts if stats.binomtest(int(k), m, a, alternative="greater").pvalue <= a)
    exact = sum(law.pmf(k) for k in counts if exceedance_test(int(k), m, n, a).p_value <= a)
    assert naive > 0.018 and exact <= a, (naive, exact)  # 1.9% and 0.8%


def test_bh_keeps_the_false_discovery_rate_on_conformal_p_values() -> None:
    rng = np.random.default_rng(10)
    q, ratios = 0.1, []
    for _ in range(500):
        cal = rng.normal(size=300)
        is_anomaly = rng.random(100) < 0.1
        batch = np.where(is_anomaly, rng.normal(3.5, 1, 100), rng.normal(size=100))
        flags, _ = benjamini_hochberg(p_values(cal, batch, "upper"), q)
        ratios.append((flags & ~is_anomaly).sum() / max(flags.sum(), 1))
    fdr, sd = float(np.mean(ratios)), float(np.std(ratios)) / math.sqrt(len(ratios))
    assert fdr <= q + 3.09 * sd, fdr


def test_cross_conformal_p_values_follow_vovks_formula() -> None:
    cal = np.array([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    folds = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([[2.5, 0.0], [25.0, 40.0]])  # new images' scores under model 0 and model 1
    # image 0: fold 0 has 1 score >= 2.5 (3), fold 1 has 1 >= 25 (30) -> (1 + 2) / 7
    # image 1: fold 0 has 3 >= 0, fold 1 has 0 >= 40 -> (1 + 3) / 7
    np.testing.assert_allclose(cross_conformal_p_values(cal, folds, s, "upper"), [3 / 7, 4 / 7])
    single = np.array([0.5, 2.0, 3.5])
    np.testing.assert_allclose(
        cross_conformal_p_values(cal, np.zeros(6, int), single[None], "two-sided"), p_values(cal, single)
    )


def test_gate_rules_parse_from_repeats_commas_and_aliases() -> None:
    rules = parse_gate(["max-rate=0.02,shift-p=0.001", "max-anomalies=10", " binom-p = 0.01 "])
    assert rules == [
        GateRule("max-rate", 0.02),
        GateRule("shift-p", 0.001),
        GateRule("max-count", 10),
        GateRule("binom-p", 0.01),
    ]
    assert parse_gate(["max-rate=0.1", "max-anomaly-rate=0.2"]) == [GateRule("max-rate", 0.2)], "last one wins"
    for bad, message in [
        ("rate=0.1", "unknown gate rule 'rate=0.1'; use max-count=LIMIT"),
        ("shift-p", "unknown gate rule"),
        ("shift-p=x", "is not a finite number"),
        ("max-count=nan", "is not a finite number"),
        ("max-rate=inf", "is not a finite number"),
        ("max-count=1.5", "whole number"),
        ("shift-p=2", "between 0 and 1"),
    ]:
        with pytest.raises(GateSpecError, match=message):
            parse_gate([bad])


def test_gate_checks_report_value_limit_and_direction() -> None:
    tests = {"shift": shift_test(np.arange(10.0) + 100, np.arange(50.0))}
    checks = evaluate_gate([GateRule("max-count", 2), GateRule("shift-p", 0.001)], 3, 10, tests)
    assert [(c.name, c.value, c.passed, c.fails_when) for c in checks] == [
        ("max-count", 3.0, False, "value > limit"),
        ("shift-p", tests["shift"].p_value, False, "p <= limit"),
    ]


def test_github_escaping_follows_the_runner_rules() -> None:
    assert github_escape_data("50% done\r\nnext: a,b") == "50%25 done%0D%0Anext: a,b"
    assert github_escape_property("dir:x/a,b%\n.png") == "dir%3Ax/a%2Cb%25%0A.png"
