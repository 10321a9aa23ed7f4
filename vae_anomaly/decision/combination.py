"""The one statistic the decision calibrates: every statistic's evidence, weighed and combined.

Each statistic j (the model's score, its guard, every image check) is taken on its own side(s),
oriented so that larger is stranger. In the bag of the n calibration images and the scored one,
a member b with value v on a side gets the conformal p-value of that side

    p_side(b) = #{bag members at least as far out as b} / (n + 1),                        (1)

and the members above the bag's (k+1)-th largest value u the smaller of (1) and a fitted tail: over
a high threshold the excesses of a statistic are close to exponential (Pickands 1975), so

    p_tail(b) = k / (n + 1) * exp(-(v - u) / sigma),  sigma = mean(B_1 .. B_k) - u,              (2)

with B_1 >= B_2 >= ... the bag's values on that side, k = `tail_size(n)`, and sigma the exponential
fit's maximum-likelihood scale of the k excesses over u, the extreme's own included: so its exponent
stays below k, and a normal image far out on one heavy-tailed statistic (the KL of an odd digit, 2.4
times the next) cannot outweigh an image beyond every normal one on several (excluding it, one MNIST
fit flagged no blank image at all). Where B_2 .. B_(k+1) hold no more than k/3 distinct values (a
discrete statistic) there is no tail: (1) alone. "Ten times further than any normal image" counts for
more than "just beyond". A two-sided statistic doubles its smaller side: p_j = min(1, 2 min(p_up,
p_down)). The evidence of the image is the Cauchy combination (Liu & Xie 2020), kept to the side of evidence:

    T(b) = sum_j w_j cot(pi min(p_j(b), 1/2))    (tan((1/2 - p) pi), 0 for p >= 1/2)       (3)

about sum_j 1 / (pi p_j): led by the most atypical statistic, so one far beyond every normal image
is not drowned by a dozen typical ones (Fisher's sum of -log p_j was, on the photo, shape and digit
sets of benchmarks/small_sets.py), yet an image extreme on several statistics is stranger than one
extreme on one. Statistics with p_j >= 1/2 add nothing, instead of the large negative terms of the
untruncated sum, which let typical statistics cancel an extreme one. The weights w_j are 1, except
over a backbone's features, where the model's score weighs more, the more images calibrate it
(features.py says why); Liu & Xie's combination allows any fixed weights. T is a symmetric
function of the bag, so

    p(x) = #{b in bag : T(b) >= T(x)} / (n + 1)                                            (4)

is an exact full-conformal p-value (Vovk et al. 2005) whatever the dependence between statistics,
with floor 1/(n+1). With K cross-fitted models, (4) counts fold by fold, each fold's members
against the new image's statistics under their model (cross-conformal, Vovk 2015). No torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

SIDES: tuple[str, ...] = ("two-sided", "upper", "lower")
TAIL_SPAN = 10  # k of (2): the spacings behind the extreme that set its tail's scale
MAX_EXCESS = 50.0  # the largest -log of (2)'s exp factor: beyond e^-50 nothing is more certain
_CHUNK = 4_000_000  # (member, image) pairs whose bounds are compared at once
_PAIRS = 100_000  # (member, image) pairs whose T is computed at once


def tail_size(n: int) -> int:
    """k of (2) for n calibration images: about a tenth of the bag, 3 to TAIL_SPAN; 0 (no tail) below 5."""
    return 0 if n < 5 else min(TAIL_SPAN, max(3, (n + 1) // 10))


@dataclass(frozen=True)
class _Side:
    """One side of one statistic, oriented so that larger is stranger, over the calibration images."""

    stat: int  # j
    sign: float  # +1 for the upper side, -1 for the lower side (values negated)
    factor: float  # 2 for a side of a two-sided statistic, else 1
    values: np.ndarray  # (n,) the calibration values, oriented
    ascending: np.ndarray  # the same, sorted
    own: np.ndarray  # (n,) #{calibration values >= each}, itself included
    top: np.ndarray  # C_0 = inf, C_1 >= ... >= C_(k+1): the largest calibration values
    k: int  # the tail's size (0: no tail)

    @classmethod
    def of(cls, stat: int, raw: np.ndarray, sign: float, factor: float) -> _Side:
        values = sign * raw
        ascending = np.sort(values)
        n = len(values)
        own = n - np.searchsorted(ascending, values, side="left")
        k = tail_size(n)
        top = np.concatenate([[np.inf], ascending[::-1][: k + 1]])
        return cls(stat, sign, factor, values, ascending, own, top, k)

    def _tail(self, x: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(u, sigma) of (2) in the bag with each new value x (None: the calibration images' own bag).

        The bag's i-th largest is clip(x, C_i, C_(i-1)): x moves each order statistic within one gap.
        """
        k = self.k
        if x is None:
            ordered = self.top[None, 1 : k + 2]  # B_1 .. B_(k+1) of the calibration images alone
        else:
            ordered = np.clip(x[:, None], self.top[None, 1 : k + 2], self.top[None, : k + 1])
        u = ordered[:, k]
        behind = ordered[:, 1:]  # B_2 .. B_(k+1), descending
        # A discrete statistic (the darkest grey level of 100 shapes takes six values) has no exponential
        # tail: where B_2 .. B_(k+1) hold no more than k/3 distinct values, sigma is 0 and only (1) counts,
        # as being the one member beyond a tie happens with probability 1/(n+1), no less.
        distinct = 1 + np.count_nonzero(np.diff(behind, axis=1), axis=1)
        sigma = np.where(distinct > k / 3, ordered[:, :k].mean(axis=1) - u, 0.0)
        return u, sigma

    def _evidence(self, v: np.ndarray, count: np.ndarray, x: np.ndarray | None) -> np.ndarray:
        """-log p_side of values v with bag counts `count`: (1), or (2) above the bag's u."""
        n = len(self.values)
        e = np.log(n + 1.0) - np.log(count)
        if self.k:
            u, sigma = self._tail(x)
            above = v > u
            if np.any(above):
                with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                    z = np.where(sigma > 0, (v - u) / sigma, 0.0)
                tail = np.log((n + 1.0) / self.k) + np.clip(z, 0.0, MAX_EXCESS)
                e = np.where(above, np.maximum(e, tail), e)  # the smaller of the two p-values
        out: np.ndarray = e - np.log(self.factor)
        return out

    def new(self, raw: np.ndarray) -> np.ndarray:
        """-log p_side of new raw values, each in its own bag."""
        x = self.sign * raw
        count = 1 + len(self.values) - np.searchsorted(self.ascending, x, side="left")
        return self._evidence(x, count, x)

    def member(self, b: np.ndarray, raw: np.ndarray | None) -> np.ndarray:
        """-log p_side of calibration members b in the bag with the paired new raw values (None: no new
        image, the calibration images' own bag)."""
        v = self.values[b]
        if raw is None:
            return self._evidence(v, self.own[b], None)
        x = self.sign * raw
        return self._evidence(v, self.own[b] + (x >= v), x)


@dataclass(frozen=True)
class Evidence:
    """(3) over a calibration set: the sides that count, and T of each calibration image in its own bag."""

    sides: list[_Side]
    n_stats: int
    n: int
    weights: np.ndarray  # w_j of (3), (J,)

    @classmethod
    def of(cls, calibration: np.ndarray, tails: Sequence[str], weights: Sequence[float] | None = None) -> Evidence:
        """(J, n) calibration values, a tail per statistic ("two-sided", "upper" or "lower") and its weight
        in (3) (None: all 1)."""
        cal = np.atleast_2d(np.asarray(calibration, dtype=np.float64))
        w = np.ones(len(cal)) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (len(cal),) or np.any(w <= 0):
            raise ValueError(f"weights must be {len(cal)} positive numbers, got {weights!r}")
        sides = []
        for j, tail in enumerate(tails):
            factor = 2.0 if tail == "two-sided" else 1.0
            if tail in ("two-sided", "upper"):
                sides.append(_Side.of(j, cal[j], 1.0, factor))
            if tail in ("two-sided", "lower"):
                sides.append(_Side.of(j, cal[j], -1.0, factor))
        return cls(sides, len(cal), cal.shape[1], w)

    def _combine(self, per_side: list[np.ndarray]) -> np.ndarray:
        """(3) from each side's -log p: a statistic's evidence is its strongest side's."""
        best = np.zeros((self.n_stats, *per_side[0].shape))
        for side, e in zip(self.sides, per_side, strict=True):
            best[side.stat] = np.maximum(best[side.stat], e)
        p = np.exp(-best)
        with np.errstate(divide="ignore"):
            terms = np.where(p < 0.5, 1.0 / np.tan(np.pi * p), 0.0)
        out: np.ndarray = (self.weights.reshape(-1, *([1] * (terms.ndim - 1))) * terms).sum(axis=0)
        return out

    def per_statistic(self, x: np.ndarray) -> np.ndarray:
        """-log p_j of new images (J, m) raw values, each statistic alone, in its own bag: (J, m); at
        least 0 (p_j <= 1)."""
        x = np.asarray(x, dtype=np.float64)
        best = np.zeros(x.shape)
        for side in self.sides:
            best[side.stat] = np.maximum(best[side.stat], side.new(x[side.stat]))
        return best

    def new(self, x: np.ndarray) -> np.ndarray:
        """T of new images, (J, m) raw values, each in its own bag: (m,)."""
        x = np.asarray(x, dtype=np.float64)
        return self._combine([side.new(x[side.stat]) for side in self.sides])

    def members(self, b: np.ndarray, x: np.ndarray | None = None) -> np.ndarray:
        """T of calibration members b in the bag with the paired new images ((J, len(b)) raw values), or
        in the calibration images' own bag (x None)."""
        b = np.asarray(b)
        return self._combine([side.member(b, None if x is None else x[side.stat, :]) for side in self.sides])

    def bounds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each calibration image: T with no new image as far out as it on any side (the largest
        it can be), T with one as far out on every side (the smallest), and whether it is the strict
        extreme of some side (its tail (2) moves with a new image that enters that side's top k + 1).
        On the sides where a member is a strict extreme its bounds hold its own-bag evidence, tail
        included: exact while the new image stays below the side's (k+1)-th largest value
        (`Evidence.moving` says where it does not; those pairs are compared exactly)."""
        log_bag = np.log(self.n + 1.0)
        highest, lowest, extremes = [], [], []
        everyone = np.arange(self.n)
        for side in self.sides:
            extreme = side.own <= side.k
            high = log_bag - np.log(side.own) - np.log(side.factor)
            low = log_bag - np.log(side.own + 1.0) - np.log(side.factor)
            if np.any(extreme):
                exact = side.member(everyone, None)
                high, low = np.where(extreme, exact, high), np.where(extreme, exact, low)
            highest.append(high)
            lowest.append(low)
            extremes.append(extreme)
        return self._combine(highest), self._combine(lowest), np.any(extremes, axis=0)

    def entering(self, x: np.ndarray) -> list[np.ndarray | None]:
        """Per side, whether each new image (x: (J, m) raw values) enters its top k + 1 (None: no tail)."""
        return [side.sign * x[side.stat] >= side.top[side.k + 1] if side.k else None for side in self.sides]

    def moving(self, b: np.ndarray, entering: Sequence[np.ndarray | None], m: int) -> np.ndarray:
        """(len(b), m): whether new image i enters the top k + 1 of a side on which member b is a strict
        extreme (`entering` per side, from `Evidence.entering`), so that b's tail (2) moves with it."""
        out = np.zeros((len(b), m), bool)
        for side, enters in zip(self.sides, entering, strict=True):
            if enters is not None:
                extreme = side.own[b] <= side.k
                if np.any(extreme):
                    out |= extreme[:, None] & enters[None, :]
        return out


def _undecided(lowest: np.ndarray, highest: np.ndarray, t_new: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(member, image) index pairs whose order the bounds leave open: lowest < T(x) <= highest."""
    step = max(1, _CHUNK // max(len(lowest), 1))
    for start in range(0, len(t_new), step):
        t = t_new[start : start + step, None]
        i, b = np.nonzero((lowest[None, :] < t) & (highest[None, :] >= t))
        if len(i):
            yield b, i + start


def _ahead(evidence: Evidence, b: np.ndarray, i: np.ndarray, x: np.ndarray, t_x: np.ndarray) -> np.ndarray:
    """For each new image, how many of the (member b, image i) pairs have the member at least as strange."""
    count = np.zeros(len(t_x))
    for start in range(0, len(b), _PAIRS):  # T of a pair takes a float per side: bounded memory
        bb, ii = b[start : start + _PAIRS], i[start : start + _PAIRS]
        count += np.bincount(ii, weights=evidence.members(bb, x[:, ii]) >= t_x[ii], minlength=len(t_x))
    return count


def p_values(
    calibration: np.ndarray,
    folds: np.ndarray,
    model_values: np.ndarray,
    tails: Sequence[str],
    weights: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(4) for each new image, and T of each under each model.

    calibration: (J, n) held-out values; folds: (n,) the model of each; model_values: (K, J, m) the
    new images' values under each model. Returns p (m,) and T (K, m).

    A new image moves a calibration member's count (1) by at most one on each side, so T(b) lies
    between its bounds (`Evidence.bounds`) whatever the new image: members whose smallest T is at
    least T(x) are ahead of x, those whose largest is below it never are, and only the rest, with the
    few strict extremes whose tail (2) moves with x, are compared pair by pair.
    """
    evidence = Evidence.of(calibration, tails, weights)
    folds = np.asarray(folds)
    values = np.asarray(model_values, dtype=np.float64)
    m = values.shape[-1]
    highest, lowest, extreme = evidence.bounds()
    count = np.zeros(m)
    t_new = np.empty((values.shape[0], m))
    for k in range(values.shape[0]):
        x = values[k]
        t_x = evidence.new(x)
        t_new[k] = t_x
        members = np.nonzero(folds == k)[0]
        plain, tails_moving = members[~extreme[members]], members[extreme[members]]
        count += len(plain) - np.searchsorted(np.sort(lowest[plain]), t_x, side="left")
        for j, i in _undecided(lowest[plain], highest[plain], t_x):
            count += _ahead(evidence, plain[j], i, x, t_x)
        # Extreme members: their bounds hold while the image stays out of their sides' tails; the pairs
        # where it enters one are compared exactly.
        step = max(1, _PAIRS // max(m, 1))
        entering = evidence.entering(x)  # the same for every chunk of members below
        for start in range(0, len(tails_moving), step):
            b = tails_moving[start : start + step]
            moves = evidence.moving(b, entering, m)
            ahead = (lowest[b][:, None] >= t_x[None, :]) & ~moves
            open_ = (lowest[b][:, None] < t_x[None, :]) & (highest[b][:, None] >= t_x[None, :]) | moves
            count += ahead.sum(axis=0)
            jb, ii = np.nonzero(open_)
            if len(jb):
                count += _ahead(evidence, b[jb], ii, x, t_x)
    p: np.ndarray = (1.0 + count) / (evidence.n + 1.0)
    return p, t_new
