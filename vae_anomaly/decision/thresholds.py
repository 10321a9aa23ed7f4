"""What a decision rule flags at, in p-values and in scores: `Threshold`, its bounds, and BH.

`Threshold` is the rule as applied to one batch (level, p-value cut-off, the
equivalent score bounds where they exist, and whether a tail model was used);
`score_bounds` reads the bounds off the calibration scores; Benjamini-Hochberg
chooses the cut-off of the `fdr` rule. `decision.DecisionRule` builds them.
No torch.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from .calibration import Tails, combined_p_values, tails_of
from .combination import Evidence
from .tail_model import TailModel


@dataclass(frozen=True)
class Threshold:
    """The decision rule actually applied, reported with every result.

    rule "auto": flag p <= alpha (`p_cutoff` = alpha); `low` and `high` are the
    equivalent score bounds (flag below `low` or above `high`; with a guard,
    for an image whose guard statistic is typical), None where no score
    reaches them or where K cross-fitted models have no single bound.
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
    guard: str | None = None  # a second statistic, in the same test (combined_p_values)
    # The level asked for, where it was below the smallest reachable p-value and `alpha` was raised
    # to that floor (see DecisionRule.applied); None where alpha is the level asked for.
    requested: float | None = None
    # The tail model (tail_model.TailModel.to_dict) where the rule flags below the conformal floor
    # 1/(n+1), so that its rate is approximate; None where every flag rests on exact p-values.
    tail_model: dict[str, Any] | None = None
    checks: int = 0  # image checks in the same test (checks.py, local.py), each on its own side

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
        if self.guard is not None or self.checks:
            others = ([self.guard] if self.guard is not None else []) + (
                [f"one of {self.checks} image checks"] if self.checks else []
            )
            where += f", or {' or '.join(others)} as atypical (one test of their combined evidence)"
        raised = "" if self.requested is None else f" (the smallest reachable level; {self.requested:g} was asked for)"
        if self.tail_model is not None:
            where += "; p-values below 1/(n+1) from a generalised Pareto tail model"
        if self.rule == "fdr":
            cut = "none" if self.p_cutoff is None else f"{self.p_cutoff:.4g}"
            return (
                f"fdr: Benjamini-Hochberg at q = {self.alpha:.4g}{raised} over {self.tail} conformal p "
                f"(cut-off {cut}), i.e. {where}"
            )
        return f"auto: conformal {self.tail} p <= {self.alpha:.4g}{raised}, i.e. {where}"


def _others_at_median(calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(J, len(scores)): the candidate scores, every other statistic at its calibration median."""
    others = np.median(calibration[1:], axis=1)
    return np.vstack([scores[None], np.repeat(others[:, None], len(scores), axis=1)])


def _ordered(value: float) -> int:
    """A float's place in the order of all floats, as an integer (IEEE 754 bits, negatives flipped)."""
    bits: int = struct.unpack("<q", struct.pack("<d", value))[0]
    return bits if bits >= 0 else -(bits & 0x7FFFFFFFFFFFFFFF)


def _from_ordered(place: int) -> float:
    bits = place if place >= 0 else (-place) | 0x8000000000000000
    value: float = struct.unpack("<d", struct.pack("<Q", bits))[0]
    return value


def _bisect(near: float, far: float, reaches: Callable[[np.ndarray], np.ndarray]) -> float:
    """The point between `near` (does not reach) and `far` (reaches) where `reaches` turns true, to the
    last float: it is monotone outward. Bisection over the floats' order, so at most 64 steps."""
    lo, hi = _ordered(near), _ordered(far)
    while abs(hi - lo) > 1:
        middle = (lo + hi) // 2
        if reaches(np.array([_from_ordered(middle)]))[0]:
            hi = middle
        else:
            lo = middle
    return _from_ordered(hi)


def _beyond(point: float, sign: float, reaches: Callable[[np.ndarray], np.ndarray]) -> float | None:
    """The score nearest `point` on side `sign` where `reaches` turns true: a doubling search for a
    step that reaches, then bisection; None if none within 2^60 steps."""
    step = max(abs(point), 1.0) * 1e-3
    near = point
    for _ in range(60):
        candidate = point + sign * step
        if reaches(np.array([candidate]))[0]:
            return _bisect(near, candidate, reaches)
        near, step = candidate, step * 2
    return None


def score_bounds(
    calibration: np.ndarray, alpha: float, tail: Tails = "two-sided", weights: Sequence[float] | None = None
) -> tuple[float | None, float | None]:
    """Score bounds (low, high) equivalent to p <= alpha for one model, read off the calibration scores.

    `calibration` is (J, n): the score's calibration scores first, then the other statistics' of the
    test. The rule's p-value (`combined_p_values`) of a score s, with every other statistic at its
    median, never rises as s moves out from the median; it steps at the calibration scores and, within
    the fitted tail (`combination`, (2)), moves continuously: the bound is found by bisection between
    the last calibration score (or point just past one) whose p-value is above alpha and the first at
    or below it, or, beyond them all, past the most extreme. Exact for the score alone; the other
    statistics can flag an image whatever its score.
    """
    if not 0 < alpha < 1:
        raise ConfigError(f"the false-positive rate must be in (0, 1), got {alpha}")
    cal = np.atleast_2d(np.asarray(calibration, dtype=np.float64))
    n = cal.shape[1]
    tails = tails_of(tail, len(cal))
    if math.floor(alpha * (n + 1) + 1e-9) < 1:
        return None, None
    folds = np.zeros(n, np.int64)

    def reaches(scores: np.ndarray) -> np.ndarray:
        p = combined_p_values(cal, folds, _others_at_median(cal, scores)[None], tails, weights)
        hit: np.ndarray = p <= alpha + 1e-12
        return hit

    median = float(np.median(cal[0]))
    bounds: list[float | None] = []
    for sign, side in ((1.0, ("two-sided", "upper")), (-1.0, ("two-sided", "lower"))):
        if tails[0] not in side:
            bounds.append(None)
            continue
        srt = np.sort(cal[0])
        points = np.unique(np.concatenate([srt, np.nextafter(srt, sign * math.inf)]))
        points = points[sign * (points - median) > 0]
        points = points[np.argsort(sign * points)]  # nearest the median first
        hit = np.nonzero(reaches(points))[0] if len(points) else np.zeros(0, np.int64)
        if len(hit):  # p is constant between calibration scores below the tail, continuous within it
            i = int(hit[0])
            bounds.append(_bisect(float(points[i - 1]) if i else median, float(points[i]), reaches))
        else:
            bounds.append(_beyond(float(srt[-1] if sign > 0 else srt[0]), sign, reaches))
    return bounds[1], bounds[0]


def tail_bounds(
    calibration: np.ndarray, model: TailModel, level: float, tail: Tails, weights: Sequence[float] | None = None
) -> tuple[float | None, float | None]:
    """The scores beyond which the tail model gives p <= level, every other statistic at its median:
    where (1) of `tail_model` equals the level, found on the combined statistic T by bisection."""
    from scipy.stats import genpareto

    share = level * (model.n + 1) / model.exceedances
    if not 0 < share < 1:
        return None, None
    cal = np.atleast_2d(np.asarray(calibration, dtype=np.float64))
    tails = tails_of(tail, len(cal))
    t_star = model.threshold + float(genpareto.isf(share, model.shape, scale=model.scale))
    evidence = Evidence.of(cal, tails, weights)

    def reaches(scores: np.ndarray) -> np.ndarray:
        hit: np.ndarray = evidence.new(_others_at_median(cal, scores)) >= t_star
        return hit

    high = _beyond(float(cal[0].max()), 1.0, reaches) if tails[0] in ("two-sided", "upper") else None
    low = _beyond(float(cal[0].min()), -1.0, reaches) if tails[0] in ("two-sided", "lower") else None
    return low, high


def auto_threshold(
    calibration: np.ndarray,
    alpha: float,
    tail: Tails = "two-sided",
    *,
    bounds: bool = True,
    weights: Sequence[float] | None = None,
) -> Threshold:
    """The `auto` rule at level alpha with its score bounds (`score_bounds`; none where `bounds` is
    False); `tail` is the score's, or one per statistic of the test, `weights` theirs in (3)."""
    low, high = score_bounds(calibration, alpha, tail, weights) if bounds else (None, None)
    return Threshold("auto", tails_of(tail, len(np.atleast_2d(calibration)))[0], alpha, low, high, alpha)


def fdr_threshold(
    calibration: np.ndarray,
    p: np.ndarray,
    q: float,
    tail: Tails = "two-sided",
    *,
    models: int = 1,
    guard: str | None = None,
    weights: Sequence[float] | None = None,
) -> Threshold:
    """The Benjamini-Hochberg rule at level q over this batch's p-values, with its score bounds.

    Score bounds exist only for one model: K cross-fitted models give flags
    that no single score bound reproduces.
    """
    _, cutoff = benjamini_hochberg(p, q)
    low = high = None
    if cutoff is not None and models == 1:
        low, high = score_bounds(calibration, min(cutoff, 1 - 1e-12), tail, weights)
    return Threshold("fdr", tails_of(tail, len(np.atleast_2d(calibration)))[0], q, low, high, cutoff, models, guard)


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
def benjamini_hochberg(p: np.ndarray, q: float) -> tuple[np.ndarray, float | None]:
    """The BH step-up procedure at level q: flags and the p-value cutoff it chose.

    Sort p_(1) <= ... <= p_(m); let k be the largest i with p_(i) <= i q / m;
    flag the k smallest. Conformal p-values sharing one calibration set are
    positively dependent (PRDS), so BH keeps the expected share of false
    alarms among flags at most q (Bates et al. 2023, Theorem 3).
    """
    if not 0 < q < 1:
        raise ConfigError(f"the false discovery rate must be in (0, 1), got {q}")
    from scipy.stats import false_discovery_control

    p = np.asarray(p, dtype=np.float64)
    if len(p) == 0:
        return np.zeros(0, bool), None
    # Adjusted p-values (SciPy): flagging adjusted <= q is the step-up procedure at level q.
    flags = false_discovery_control(p, method="bh") <= q + 1e-12
    if not flags.any():
        return flags, None
    cutoff = float(p[flags].max())
    return p <= cutoff, cutoff
