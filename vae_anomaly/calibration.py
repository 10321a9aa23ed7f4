"""Conformal p-values from held-out normal scores (Vovk et al. 2005; Bates et al. 2023).

The calibration scores s_1..s_n come from normal images the model never
trained on. If a new normal image's score is exchangeable with them, its
conformal p-value is uniform, so flagging p <= alpha flags at most a
fraction alpha of normal images. `decision.py` turns p-values into flags;
`batch_tests.py` tests whole batches. No torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .errors import CalibrationError, ConfigError
from .tail_model import TailModel, at_floor, covers, fit_tail, refine

Tail = Literal["two-sided", "upper"]
TAILS: tuple[str, ...] = ("two-sided", "upper")
# One tail for every statistic of a test, or one per statistic (the score's, then the guard's and the
# property checks', which are always two-sided).
Tails = str | Sequence[str]


def tails_of(tail: Tails, n_stats: int) -> list[str]:
    """Each statistic's tail; one string applies to all."""
    out = [tail] * n_stats if isinstance(tail, str) else list(tail)
    if len(out) != n_stats or any(t not in TAILS for t in out):
        raise ConfigError(f"tails must be {n_stats} of {', '.join(TAILS)}, got {tail!r}")
    return out


def p_values(calibration: np.ndarray, scores: np.ndarray, tail: str = "two-sided") -> np.ndarray:
    """Conformal p-values of `scores` against the calibration scores.

    p_high = (1 + #{i : s_i >= s}) / (n + 1)   (unusually high score)
    p_low  = (1 + #{i : s_i <= s}) / (n + 1)   (unusually low: too simple)
    two-sided: p = min(1, 2 * min(p_high, p_low)); upper: p = p_high.
    """
    if tail not in TAILS:
        raise ConfigError(f"tail must be one of {', '.join(TAILS)}, got {tail!r}")
    cal = np.sort(np.asarray(calibration, dtype=np.float64))
    s = np.asarray(scores, dtype=np.float64)
    n = len(cal)
    if n == 0:
        raise CalibrationError("no calibration scores: the model file holds none for this score")
    n_ge = n - np.searchsorted(cal, s, side="left")
    p_high = (1.0 + n_ge) / (n + 1.0)
    if tail == "upper":
        return p_high
    n_le = np.searchsorted(cal, s, side="right")
    p_low = (1.0 + n_le) / (n + 1.0)
    two_sided: np.ndarray = np.minimum(1.0, 2.0 * np.minimum(p_high, p_low))
    return two_sided


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


def smallest_p_value(n: int) -> float:
    """The smallest p-value n calibration scores can give: 1/(n+1), whatever the tail or the guard."""
    return min(1.0, 1.0 / (n + 1.0))


def calibration_needed(alpha: float) -> int:
    """How many calibration scores make p <= alpha reachable at all: n >= 1/alpha - 1."""
    return max(1, math.ceil(1.0 / alpha - 1.0 - 1e-9))


# ------------------------------------------------------ the typicality statistic
# The quantiles that centre and scale each statistic. Order statistics of the
# bag (the calibration scores plus the scored image), so that the scale is a
# symmetric function of the bag and the conformal p-value stays exact. The
# 5th and 95th percentiles scale a side whose quartile coincides with the
# median (a discrete statistic: the 99th-percentile brightness of slide tiles
# is one grey level for half of them).
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


def deviations(calibration: np.ndarray, values: np.ndarray, tail: Tails) -> np.ndarray:
    """Each image's largest deviation over the J statistics, quartiles from its bag: (m,) from (J, m)."""
    cal = np.atleast_2d(np.asarray(calibration, dtype=np.float64))
    x = np.atleast_2d(np.asarray(values, dtype=np.float64))
    tails = tails_of(tail, len(cal))
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


def typicality_p_values(
    calibration: np.ndarray,
    folds: np.ndarray,
    model_scores: np.ndarray,
    tail: Tails = "two-sided",
) -> np.ndarray:
    """The p-values of `_typicality` (see there)."""
    return _typicality(calibration, folds, model_scores, tail)[0]


def _typicality(
    calibration: np.ndarray,
    folds: np.ndarray,
    model_scores: np.ndarray,
    tail: Tails = "two-sided",
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
    tails = tails_of(tail, n_stats)
    m = scores.shape[-1]
    if n == 0:
        raise CalibrationError("no calibration scores: the model file holds none for this score")
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
        raise ConfigError(f"tail must be one of {', '.join(TAILS)}, got {tail!r}")
    cal = np.asarray(calibration, dtype=np.float64)
    folds = np.asarray(folds)
    scores = np.atleast_2d(np.asarray(model_scores, dtype=np.float64))
    n = len(cal)
    if n == 0:
        raise CalibrationError("no calibration scores: the model file holds none for this score")
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
class Calibration:
    """A model's held-out normal scores of every statistic, and the model (fold) that scored each.

    One model: `folds` is all zeros and p-values are plain conformal ones.
    K cross-fitted models: calibration score i comes from the model that did
    not train on image i, and p-values are cross-conformal.
    """

    scores: dict[str, np.ndarray]
    folds: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    models: int = 1
    # Tail models fitted so far, by (statistics, tail): a decision asks twice (p-values, guarantee).
    _tails: dict[tuple[tuple[str, ...], tuple[str, ...]], TailModel | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def of(self, name: str) -> np.ndarray:
        """The calibration scores of one statistic, or a CalibrationError that says what to do."""
        cal = self.scores.get(name)
        if cal is None or len(cal) == 0:
            raise CalibrationError(
                f"the model holds no calibration scores for {name!r} (written by an older vae-anomaly?): "
                f"re-fit it, or score with one of {', '.join(sorted(self.scores))} and --guard none"
            )
        return cal

    def stacked(self, names: Sequence[str]) -> np.ndarray:
        """The (J, n) calibration scores of the statistics `names`, in that order."""
        return np.stack([np.asarray(self.of(name), dtype=np.float64) for name in names])

    def tail_model(self, names: Sequence[str], tail: Tails = "two-sided") -> TailModel | None:
        """The tail model (`tail_model.fit_tail`) of the calibration images' deviations, where n is in its range."""
        key = (tuple(names), tuple(tails_of(tail, len(names))))
        if key not in self._tails:
            cal = self.stacked(names)
            self._tails[key] = fit_tail(deviations(cal, cal, tail)) if covers(cal.shape[1]) else None
        return self._tails[key]

    def p_values(
        self,
        names: Sequence[str],
        scores: Sequence[np.ndarray],
        model_scores: Sequence[np.ndarray | None],
        tail: Tails = "two-sided",
        *,
        exact: bool = False,
    ) -> np.ndarray:
        """One conformal p-value per image for the statistics `names` together (`typicality_p_values`).

        `scores[j]` are statistic j's scores (N,), `model_scores[j]` each model's (K, N) for K
        cross-fitted models (None for one model). Images at the floor 1/(n+1) get the tail model's
        smaller p-value (`tail_model.refine`) unless `exact`.
        """
        cal = self.stacked(names)
        if len(scores[0]) == 0:
            return np.zeros(0)
        if self.models == 1:
            per_model = np.stack([np.asarray(s, dtype=np.float64) for s in scores])[None]
            folds = np.zeros(cal.shape[1], np.int64)
        else:
            missing = [name for name, ms in zip(names, model_scores, strict=True) if ms is None]
            if missing:
                raise CalibrationError(
                    f"{self.models} cross-fitted models need each model's {missing[0]} scores, and only their "
                    "mean was given"
                )
            per_model = np.stack([np.atleast_2d(np.asarray(ms, dtype=np.float64)) for ms in model_scores], axis=1)
            folds = self.folds
        p, d_new = _typicality(cal, folds, per_model, tail)
        if exact or not np.any(at_floor(p, cal.shape[1])):
            return p  # no image at the floor: nothing for the tail model to refine (nor to fit it for)
        model = self.tail_model(names, tail)
        return p if model is None else refine(p, cal.shape[1], d_new, model)
