"""The decision rule of fc067ad, the one issue 29 replaced, kept to be measured beside today's.

T = (rho, d): each member of the bag of n calibration images and the scored one is ranked by rho,
its rank from the nearer end of the statistic it is most extreme in, ties broken by d, its largest
deviation in quartile units; every statistic two-sided but the local statistic (upper), balance-x
and balance-y included; below the floor 1/(n+1), the generalised Pareto tail of the deviations.
Only `benchmarks/small_sets.py` uses it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from vae_anomaly.decision.tail_model import at_floor, covers, fit_tail, refine

_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
MEDIAN = 2  # the median's column in bag_quantiles
_OUTER = 1.6449 / 0.6745  # z(0.95) / z(0.75): an outer quantile's span in half-interquartile units


def bag_quantiles(calibration: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The 5th, 25th, 50th, 75th and 95th percentiles of each bag {s_1..s_n, v}: (m, 5).

    Order statistic r (0-based, r = round(q n)) of the n + 1 bag values is
    clip(v, s_(r-1), s_(r)) with s sorted: the new value only moves it within
    one calibration gap, so this costs O(m) after one sort.
    """
    cal = np.sort(np.asarray(calibration, dtype=np.float64))
    n = len(cal)
    r = np.clip(np.round(np.array(_QUANTILES) * n).astype(np.int64), 1, max(n - 1, 1))
    lo, hi = cal[np.minimum(r - 1, n - 1)], cal[np.minimum(r, n - 1)]
    return np.clip(np.asarray(values, dtype=np.float64)[:, None], lo, hi)


def side_scales(quantiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The scale of each side, (low, high): the half interquartile range m - q1 or q3 - m; where that
    is 0 (a discrete statistic), the 5th or 95th percentile's distance over z(0.95)/z(0.75), in the
    same units; where that is 0 too, a constant statistic: a tiny scale, any change infinitely atypical."""
    q = np.asarray(quantiles, dtype=np.float64)
    q05, q1, m, q3, q95 = (q[..., i] for i in range(5))
    tiny = 1e-9 * np.maximum(1.0, np.abs(m))
    high = np.where(q3 > m, q3 - m, np.where(q95 > m, (q95 - m) / _OUTER, tiny))
    low = np.where(q1 < m, m - q1, np.where(q05 < m, (m - q05) / _OUTER, tiny))
    return low, high


def deviation(scores: np.ndarray, quantiles: np.ndarray, tail: str) -> np.ndarray:
    """How atypical each score is, in units of its side's half interquartile range.

    With (q1, m, q3) the bag's quartiles (`bag_quantiles`, broadcast against the scores):
        d = (s - m) / (q3 - m)  for s >= m, or when tail = "upper"
        d = (m - s) / (m - q1)  for s <  m  (two-sided: too simple, too likely)
    A scale per side, since scores such as -ELBO are skewed (`side_scales`: a side whose quartile is
    the median is scaled by its outer percentile).
    """
    s = np.asarray(scores, dtype=np.float64)
    m = np.asarray(quantiles, dtype=np.float64)[..., MEDIAN]
    low, high = side_scales(quantiles)
    up: np.ndarray = (s - m) / high
    if tail == "upper":
        return up
    both: np.ndarray = np.where(s >= m, up, (m - s) / low)
    return both


def deviations(calibration: np.ndarray, values: np.ndarray, tail: list[str]) -> np.ndarray:
    """Each image's largest deviation over the J statistics, quartiles from its bag: (m,) from (J, m)."""
    cal = np.atleast_2d(np.asarray(calibration, dtype=np.float64))
    x = np.atleast_2d(np.asarray(values, dtype=np.float64))
    tails = tail
    d: np.ndarray = np.max([deviation(x[j], bag_quantiles(cal[j], x[j]), tails[j]) for j in range(len(cal))], axis=0)
    return d


def _ranks(cal: np.ndarray, values: np.ndarray, tail: str) -> np.ndarray:
    """How many calibration scores are at least as extreme as each value, per side: (2, len(values)).

    An upper-tailed statistic has no lower side: its second row is n + 1, more than any rank.
    """
    srt = np.sort(cal)
    up = len(srt) - np.searchsorted(srt, values, side="left")  # #{s_i >= v}
    if tail == "upper":
        return np.stack([up, np.full_like(up, len(srt) + 1)])
    return np.stack([up, np.searchsorted(srt, values, side="right")])  # and #{s_i <= v}


def _pairs(
    lo: np.ndarray, hi: np.ndarray, members: np.ndarray, limit: int = 2_000_000
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(image, member) index pairs, image i with members[lo[i]:hi[i]], in chunks of about `limit` pairs."""
    sizes = hi - lo
    ends = np.cumsum(sizes)
    start = 0
    while start < len(lo):
        stop = max(start + 1, int(np.searchsorted(ends, (ends[start - 1] if start else 0) + limit, side="right")))
        i = np.repeat(np.arange(start, stop), sizes[start:stop])
        offset = np.arange(len(i)) - np.repeat(np.cumsum(sizes[start:stop]) - sizes[start:stop], sizes[start:stop])
        yield i, members[lo[i] + offset]
        start = stop


def _typicality(
    calibration: np.ndarray,
    folds: np.ndarray,
    model_scores: np.ndarray,
    tail: list[str],
) -> tuple[np.ndarray, np.ndarray]:
    """One conformal p-value per image for J statistics taken together (the score and its guard).

    In the bag of n calibration images plus the scored one, each member b gets
        rho(b) = min over statistics j and sides of #{bag members at least as extreme as b},
    its rank from the nearer end of the statistic it is most extreme in (1: beyond every other
    member on some side), and d(b), its largest deviation (`deviation`, scaled by the bag's
    quartiles), which breaks ties between equal ranks. T = (rho, d) orders the bag from most to
    least atypical; it is a symmetric function of the bag, so with one model

        p = #{b in bag : rho(b) < rho(x), or rho(b) = rho(x) and d(b) >= d(x)} / (n + 1)

    is an exact conformal p-value (full conformal, Vovk et al. 2005), whatever the dependence of
    the statistics. Its floor is 1/(n+1), reached by an image beyond every calibration image on
    some side and further out than any other side's most extreme image; it is never above the
    Bonferroni rule's 2 J rho(x) / (n + 1). With K cross-fitted models the counts are summed fold
    by fold, each fold's images against the new image's score under their model (cross-conformal,
    Vovk 2015), ranks and quartiles taken over all n.

    calibration: (J, n) held-out scores; folds: (n,) the model of each;
    model_scores: (K, J, m) the new images' scores under each model; tail: one for all statistics
    or one each. Returns the p-values (m,) and each new image's deviation d under each model (K, m),
    which the tail model reads.
    """
    cal = np.atleast_2d(np.asarray(calibration, dtype=np.float64))
    scores = np.asarray(model_scores, dtype=np.float64)
    n_stats, n = cal.shape
    tails = tail
    m = scores.shape[-1]
    if n == 0:
        raise ValueError("no calibration scores: the model file holds none for this score")
    folds = np.asarray(folds)
    if scores.ndim != 3 or scores.shape[1] != n_stats or scores.shape[0] != int(folds.max()) + 1:
        models = int(folds.max()) + 1
        raise ValueError(f"scores of shape {scores.shape} given for {n_stats} statistics, {models} models")
    # Each calibration image's rank among the calibration images alone (itself included), (J, sides, n),
    # and its smallest, r. A new image x moves a member's rank by at most one, so rho(b) is r(b) or
    # r(b) + 1: members with r(b) <= rho(x) - 2 are all ahead of x, those with r(b) > rho(x) never, and
    # only the few with r(b) in {rho(x) - 1, rho(x)} need x's own comparison. O((n + m) log n) in all,
    # instead of comparing every new image with every member.
    own = np.stack([_ranks(c, c, t) for c, t in zip(cal, tails, strict=True)])
    r = own.min(axis=(0, 1))
    quartiles = [
        bag_quantiles(cal[j], scores[:, j].ravel()).reshape(*scores[:, j].shape, len(_QUANTILES))
        for j in range(n_stats)
    ]
    count = np.zeros(m)
    d_new = np.empty((scores.shape[0], m))
    for k in range(scores.shape[0]):
        members = np.nonzero(folds == k)[0]
        members = members[np.argsort(r[members], kind="stable")]
        r_sorted = r[members]
        x = scores[k]  # (J, m)
        rho_x = np.min([_ranks(cal[j], x[j], tails[j]) for j in range(n_stats)], axis=(0, 1)) + 1
        d_x = np.max([deviation(x[j], quartiles[j][k], tails[j]) for j in range(n_stats)], axis=0)
        d_new[k] = d_x
        count += np.searchsorted(r_sorted, rho_x - 2, side="right")
        lo = np.searchsorted(r_sorted, rho_x - 1, side="left")
        hi = np.searchsorted(r_sorted, rho_x, side="right")
        for i, b in _pairs(lo, hi, members):
            rb = r[b]
            stays = np.zeros(len(b), dtype=bool)  # some side at rank r(b) that x does not push back
            d_b = np.full(len(b), -np.inf)
            for j in range(n_stats):
                c, xj = cal[j, b], x[j, i]
                pushed = (xj >= c, xj <= c)
                for side in range(own.shape[1]):
                    stays |= (own[j, side, b] == rb) & ~pushed[side]
                d_b = np.maximum(d_b, deviation(c, quartiles[j][k][i], tails[j]))
            rho_b = rb + ~stays
            ahead = (rho_b < rho_x[i]) | ((rho_b == rho_x[i]) & (d_b >= d_x[i]))
            count += np.bincount(i, weights=ahead, minlength=m)
    p: np.ndarray = (1.0 + count) / (n + 1.0)
    return p, d_new


def previous_p_values(
    calibration: np.ndarray, folds: np.ndarray, model_scores: np.ndarray, tails: list[str]
) -> np.ndarray:
    """fc067ad's `Calibration.p_values`: (J, n) calibration values, (n,) folds, (K, J, m) scores."""
    p, d_new = _typicality(calibration, folds, model_scores, tails)
    n = calibration.shape[1]
    if not np.any(at_floor(p, n)) or not covers(n):
        return p
    return refine(p, n, d_new, fit_tail(deviations(calibration, calibration, tails)))
