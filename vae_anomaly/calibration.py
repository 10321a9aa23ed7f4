"""From scores to decisions: conformal p-values and thresholds.

The calibration scores s_1..s_n come from normal images the model never
trained on. If a new normal image's score is exchangeable with them, its
conformal p-value is uniform, so flagging p <= alpha flags at most a
fraction alpha of normal images (Vovk et al. 2005; Bates et al. 2023).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

Tail = Literal["two-sided", "upper"]
TAILS: tuple[str, ...] = ("two-sided", "upper")


def p_values(calibration: np.ndarray, scores: np.ndarray, tail: str = "two-sided") -> np.ndarray:
    """Conformal p-values of `scores` against the calibration scores.

    p_high = (1 + #{i : s_i >= s}) / (n + 1)   (unusually high score)
    p_low  = (1 + #{i : s_i <= s}) / (n + 1)   (unusually low: too simple)
    two-sided: p = min(1, 2 * min(p_high, p_low)); upper: p = p_high.
    """
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {', '.join(TAILS)}, got {tail!r}")
    cal = np.sort(np.asarray(calibration, dtype=np.float64))
    s = np.asarray(scores, dtype=np.float64)
    n = len(cal)
    if n == 0:
        raise ValueError("no calibration scores: the model file holds none for this score")
    n_ge = n - np.searchsorted(cal, s, side="left")
    p_high = (1.0 + n_ge) / (n + 1.0)
    if tail == "upper":
        return p_high
    n_le = np.searchsorted(cal, s, side="right")
    p_low = (1.0 + n_le) / (n + 1.0)
    return np.minimum(1.0, 2.0 * np.minimum(p_high, p_low))


def decision_statistic(
    calibration: np.ndarray, scores: np.ndarray, tail: str = "two-sided", p: np.ndarray | None = None
) -> np.ndarray:
    """A number per image that orders images as the decision does (higher = more anomalous).

    The conformal p-value, made continuous: p-values tie beyond the
    calibration range, so ties are broken by how far the score lies from
    the calibration median in interquartile ranges (two-sided), or by the
    score itself (upper tail). Returned as ranks 1..N, for sorting reports
    and for ROC-AUC of the decision rule itself.
    """
    s = np.asarray(scores, dtype=np.float64)
    if len(s) == 0:
        return np.zeros(0)
    if p is None:  # cross-fitted models pass their own cross-conformal p-values
        p = p_values(calibration, s, tail)
    if tail == "two-sided":
        q1, med, q3 = np.percentile(calibration, [25, 50, 75])
        tie = np.abs(s - med) / max(q3 - q1, 1e-12)
    else:
        tie = s
    order = np.lexsort((-tie, p))  # most anomalous first
    ranks = np.empty(len(s))
    ranks[order] = np.arange(len(s), 0, -1, dtype=np.float64)
    return ranks


def smallest_p_value(n: int, tail: str = "two-sided") -> float:
    """The smallest p-value n calibration scores can give: 1/(n+1), or 2/(n+1) two-sided."""
    return min(1.0, (2.0 if tail == "two-sided" else 1.0) / (n + 1.0))


def calibration_needed(alpha: float, tail: str = "two-sided") -> int:
    """How many calibration scores make p <= alpha reachable at all."""
    return max(1, math.ceil((2.0 if tail == "two-sided" else 1.0) / alpha - 1.0 - 1e-9))


@dataclass(frozen=True)
class Threshold:
    """The decision rule actually applied, reported with every result.

    rule "auto": flag p <= alpha (`p_cutoff` = alpha); `low` and `high` are the
    equivalent score bounds (flag below `low` or above `high`), None where no
    score reaches them or where K cross-fitted models have no single bound.
    rule "fdr": Benjamini-Hochberg at level alpha over the batch; `p_cutoff` is
    the p-value cut-off it chose (None: nothing flagged), bounds as for "auto".
    rule "score": flag score >= `high`, a raw threshold chosen by the user.
    """

    rule: str
    tail: str
    alpha: float | None
    low: float | None
    high: float | None
    p_cutoff: float | None = None
    models: int = 1
    guard: str | None = None  # a second statistic, combined by Bonferroni

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.rule == "score":
            return f"score >= {self.high:.6g} (a raw score threshold)"
        bounds = []
        if self.low is not None:
            bounds.append(f"score <= {self.low:.6g}")
        if self.high is not None:
            bounds.append(f"score >= {self.high:.6g}")
        if self.models > 1:
            where = f"cross-conformal over {self.models} cross-fitted models"
        elif bounds:
            where = " or ".join(bounds)
        elif self.rule == "fdr":
            where = "no image (no p-value passed the step-up test)"
        else:
            where = "no score (too few calibration images)"
        if self.guard is not None:
            where += (
                f", or {self.guard} atypical (Bonferroni: p = min(1, 2 min(p_score, p_{self.guard})),"
                " each test at half the level)"
            )
        if self.rule == "fdr":
            cut = "none" if self.p_cutoff is None else f"{self.p_cutoff:.4g}"
            return (
                f"fdr: Benjamini-Hochberg at q = {self.alpha:g} over {self.tail} conformal p "
                f"(cut-off {cut}), i.e. {where}"
            )
        return f"auto: conformal {self.tail} p <= {self.alpha:g}, i.e. {where}"


def auto_threshold(calibration: np.ndarray, alpha: float, tail: str = "two-sided") -> Threshold:
    """Score bounds equivalent to p <= alpha, read off the calibration scores.

    p_high <= a holds when at most k = floor(a (n+1)) - 1 calibration scores
    are >= s, i.e. for s above the (k+1)-th largest; likewise for p_low.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"the false-positive rate must be in (0, 1), got {alpha}")
    cal = np.sort(np.asarray(calibration, dtype=np.float64))
    n = len(cal)
    a = alpha / 2.0 if tail == "two-sided" else alpha
    k = math.floor(a * (n + 1) + 1e-9) - 1  # calibration scores allowed at or beyond s
    high = low = None
    if k >= 0:
        high = float(np.nextafter(cal[n - 1 - k], np.inf)) if k < n else float(cal[0])
        if tail == "two-sided":
            low = float(np.nextafter(cal[k], -np.inf)) if k < n else float(cal[-1])
    return Threshold("auto", tail, alpha, low, high, alpha)


def fdr_threshold(
    calibration: np.ndarray,
    p: np.ndarray,
    q: float,
    tail: str = "two-sided",
    *,
    models: int = 1,
    guard: str | None = None,
) -> Threshold:
    """The Benjamini-Hochberg rule at level q over this batch's p-values, with its score bounds.

    Score bounds exist only for one test on one model: a guard statistic or
    K cross-fitted models give flags that no single score bound reproduces.
    `Detector.decide` and `vae-anomaly merge` (which re-runs BH over the union
    of shards) both build the rule here, so the two cannot disagree.
    """
    _, cutoff = benjamini_hochberg(p, q)
    low = high = None
    if cutoff is not None and models == 1 and guard is None:
        bounds = auto_threshold(calibration, min(cutoff, 1 - 1e-12), tail)
        low, high = bounds.low, bounds.high
    return Threshold("fdr", tail, q, low, high, cutoff, models, guard)


def score_threshold(value: float) -> Threshold:
    return Threshold("score", "upper", None, None, float(value))


def flag(scores: np.ndarray, p: np.ndarray, threshold: Threshold) -> np.ndarray:
    """Boolean flags under the chosen rule."""
    if threshold.rule == "score":
        return np.asarray(scores) >= threshold.high
    if threshold.p_cutoff is None:
        return np.zeros(len(np.asarray(p)), bool)
    return np.asarray(p) <= threshold.p_cutoff + 1e-12


# ------------------------------------------------------ batch-level error control
def bh_adjusted(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values: min over j >= i of p_(j) m / j, capped at 1.

    Flagging adjusted p <= q is the BH procedure at level q (what SciPy's
    `false_discovery_control(p, method="bh")` returns, here in numpy alone).
    """
    p = np.asarray(p, dtype=np.float64)
    m = len(p)
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def benjamini_hochberg(p: np.ndarray, q: float) -> tuple[np.ndarray, float | None]:
    """The BH step-up procedure at level q: flags and the p-value cutoff it chose.

    Sort p_(1) <= ... <= p_(m); let k be the largest i with p_(i) <= i q / m;
    flag the k smallest. Conformal p-values sharing one calibration set are
    positively dependent (PRDS), so BH keeps the expected share of false
    alarms among flags at most q (Bates et al. 2023, Theorem 3).
    """
    if not 0 < q < 1:
        raise ValueError(f"the false discovery rate must be in (0, 1), got {q}")
    p = np.asarray(p, dtype=np.float64)
    m = len(p)
    if m == 0:
        return np.zeros(0, bool), None
    ps = np.sort(p)
    below = np.nonzero(ps <= q * np.arange(1, m + 1) / m + 1e-12)[0]
    if len(below) == 0:
        return np.zeros(m, bool), None
    cutoff = float(ps[below[-1]])
    return p <= cutoff, cutoff


def cross_conformal_p_values(
    calibration: np.ndarray, folds: np.ndarray, model_scores: np.ndarray, tail: str = "two-sided"
) -> np.ndarray:
    """Cross-conformal p-values (Vovk 2015) for K cross-fitted models.

    calibration[i] is normal image i's score under the model that did not see
    it (the one of its fold, folds[i]); model_scores[k, j] is new image j's
    score under model k. With n normal images in all:

        p_high = (1 + sum_k #{i in fold k : s_i^(k) >= s^(k)}) / (n + 1)

    and p_low alike with <=. Each new image is compared, fold by fold, with
    images the same model never saw. With K = 1 this is `p_values`.
    """
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {', '.join(TAILS)}, got {tail!r}")
    cal = np.asarray(calibration, dtype=np.float64)
    folds = np.asarray(folds)
    scores = np.atleast_2d(np.asarray(model_scores, dtype=np.float64))
    n = len(cal)
    if n == 0:
        raise ValueError("no calibration scores: the model file holds none for this score")
    if scores.shape[0] != int(folds.max()) + 1:
        raise ValueError(f"{scores.shape[0]} models' scores given for {int(folds.max()) + 1} folds")
    n_ge = np.zeros(scores.shape[1])
    n_le = np.zeros(scores.shape[1])
    for k in range(scores.shape[0]):
        ck = np.sort(cal[folds == k])
        n_ge += len(ck) - np.searchsorted(ck, scores[k], side="left")
        n_le += np.searchsorted(ck, scores[k], side="right")
    p_high = (1.0 + n_ge) / (n + 1.0)
    if tail == "upper":
        return p_high
    return np.minimum(1.0, 2.0 * np.minimum(p_high, (1.0 + n_le) / (n + 1.0)))


@dataclass(frozen=True)
class BatchTest:
    """One batch-level test: its statistic, p-value, and what it compared."""

    name: str
    statistic: float
    p_value: float
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def shift_test(batch: np.ndarray, reference: np.ndarray, name: str = "shift") -> BatchTest:
    """One-sided Mann-Whitney U: are the batch's scores stochastically above the reference's?

    Rank-based, so it needs no assumption on the score distribution; under
    the null (batch and reference from the same distribution) its p-value is
    uniform, so failing at p <= a fails a normal batch with probability <= a.
    """
    from scipy.stats import mannwhitneyu

    b = np.asarray(batch, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if len(b) == 0 or len(r) == 0:
        return BatchTest(name, math.nan, 1.0, f"nothing to compare ({len(b)} vs {len(r)} scores)")
    res = mannwhitneyu(b, r, alternative="greater")
    auc = float(res.statistic) / (len(b) * len(r))
    return BatchTest(
        name,
        float(res.statistic),
        float(res.pvalue),
        f"Mann-Whitney U = {float(res.statistic):.6g} ({len(b)} vs {len(r)} scores; "
        f"P(batch score > reference score) = {auc:.3f}, 0.5 when alike)",
    )


def exceedance_test(count: int, m: int, n_calibration: int, alpha: float, tail: str = "two-sided") -> BatchTest:
    """Are more of m images at p <= alpha than a normal batch would give? One-sided.

    The plain binomial test (count ~ Binomial(m, alpha)) is too eager here:
    all images of a batch share one calibration set, so the rate at which
    normal images reach p <= alpha is itself random (a Beta(j, n + 1 - j)
    variable, j the number of calibration gaps beyond the cut-off) and the
    count of a normal batch is beta-binomial, more spread than a binomial.
    With 400 calibration scores and 200 images at 1% two-sided, the binomial
    test fails 1.9% of normal batches at level 1%; this exact test 0.8%.
    The binomial p-value (SciPy's `binomtest`) is kept in `detail`.
    """
    from scipy.stats import betabinom, binomtest

    if m == 0:
        return BatchTest("binomial", 0.0, 1.0, "no images scored")
    a = alpha / 2.0 if tail == "two-sided" else alpha
    j = math.floor(a * (n_calibration + 1) + 1e-9) * (2 if tail == "two-sided" else 1)
    if j <= 0:
        p = 1.0  # no image can reach p <= alpha at all
    elif j >= n_calibration + 1:
        p = 1.0
    else:
        p = float(betabinom.sf(count - 1, m, j, n_calibration + 1 - j))
    naive = float(binomtest(count, m, alpha, alternative="greater").pvalue)
    return BatchTest(
        "binomial",
        float(count),
        min(1.0, p),
        f"{count} of {m} images at p <= {alpha:g}, {alpha * m:.3g} expected; beta-binomial "
        f"(calibration of {n_calibration}) p = {p:.3g}; plain binomial p = {naive:.3g}",
    )


def shift_sample(scores: np.ndarray, model_scores: np.ndarray | None = None) -> np.ndarray:
    """The batch's side of the shift test, on the calibration scores' scale.

    A single model: the batch's scores. K cross-fitted models: calibration
    score i comes from the model of its fold, so batch image j (j counts the
    readable images in listing order) is taken from model j mod K; both
    samples then mix the K models' out-of-sample scores in (nearly) equal
    shares. `model_scores` is (K, N).
    """
    if model_scores is None or model_scores.shape[0] == 1:
        return np.asarray(scores, dtype=np.float64)
    k, m = model_scores.shape
    return model_scores[np.arange(m) % k, np.arange(m)]


def run_batch_tests(
    scores: np.ndarray,
    p: np.ndarray,
    reference: np.ndarray,
    *,
    fpr: float = 0.01,
    tail: str = "two-sided",
    model_scores: np.ndarray | None = None,
    baseline: np.ndarray | None = None,
) -> dict[str, BatchTest]:
    """Batch-level tests, each a one-sided p-value (small = the batch looks worse than normal).

    shift:    Mann-Whitney U, batch scores (see `shift_sample`) above the calibration scores?
    binomial: more images at p <= fpr than a normal batch gives?
    drift:    Mann-Whitney U, batch scores above `baseline` (a previous batch's scores)?

    Everything comes from arrays, so `vae-anomaly merge` re-runs the tests
    over the union of shards exactly as `score` runs them over one batch.
    """
    count = int(np.sum(np.asarray(p) <= fpr + 1e-12))
    tests = {
        "shift": shift_test(shift_sample(scores, model_scores), reference, "shift"),
        "binomial": exceedance_test(count, len(scores), len(reference), fpr, tail),
    }
    if baseline is not None:
        tests["drift"] = shift_test(scores, np.asarray(baseline, dtype=np.float64), "drift")
    return tests


def guarantee(threshold: Threshold) -> str:
    """The decision rule's error guarantee, in one plain sentence."""
    if threshold.rule == "fdr":
        return (
            f"Benjamini-Hochberg at {threshold.alpha:g}: the expected share of false alarms among flagged "
            f"images is at most {threshold.alpha:g}."
        )
    if threshold.rule == "auto":
        return f"Each normal image is flagged with probability at most {threshold.alpha:g} (conformal p <= alpha)."
    return "A raw score threshold: no error rate is guaranteed."
