"""Batch-level tests: does this batch, taken together, look worse than normal batches?

Each returns a one-sided p-value (small = worse than normal); gate rules
(`gate.py`) fail on them. Everything comes from arrays, so `vae-anomaly
merge` re-runs the tests over the union of shards exactly as `score` runs
them over one batch. No torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


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


def exceedance_test(count: int, m: int, n_calibration: int, alpha: float) -> BatchTest:
    """Are more of m images at p <= alpha than a normal batch would give? One-sided.

    The plain binomial test (count ~ Binomial(m, alpha)) is too eager here:
    all images of a batch share one calibration set, so the rate at which
    normal images reach p <= alpha is itself random (a Beta(j, n + 1 - j)
    variable, j = floor(alpha (n+1)) the number of calibration gaps beyond the
    cut-off of the rule's one test) and the count of a normal batch is
    beta-binomial, more spread than a binomial.
    With 400 calibration scores and 200 images at 1%, the binomial test fails
    normal batches at about twice its level; this exact test at most at it.
    The binomial p-value (SciPy's `binomtest`) is kept in `detail`.
    """
    from scipy.stats import betabinom, binomtest

    if m == 0:
        return BatchTest("binomial", 0.0, 1.0, "no images scored")
    j = math.floor(alpha * (n_calibration + 1) + 1e-9)
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
    taken: np.ndarray = model_scores[np.arange(m) % k, np.arange(m)]
    return taken


def run_batch_tests(
    scores: np.ndarray,
    p: np.ndarray,
    reference: np.ndarray,
    *,
    fpr: float = 0.01,
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
        "binomial": exceedance_test(count, len(scores), len(reference), fpr),
    }
    if baseline is not None:
        tests["drift"] = shift_test(scores, np.asarray(baseline, dtype=np.float64), "drift")
    return tests
