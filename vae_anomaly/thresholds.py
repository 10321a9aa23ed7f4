"""What a decision rule flags at, in p-values and in scores: `Threshold`, its bounds, and BH.

`Threshold` is the rule as applied to one batch (level, p-value cut-off, the
equivalent score bounds where they exist, and whether a tail model was used);
`score_bounds` reads the bounds off the calibration scores; Benjamini-Hochberg
chooses the cut-off of the `fdr` rule. `decision.DecisionRule` builds them.
No torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .calibration import MEDIAN, Tails, bag_quantiles, deviation, side_scales, tails_of, typicality_p_values
from .errors import ConfigError
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
    guard: str | None = None  # a second statistic, in the same test (typicality_p_values)
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
            where += f", or {' or '.join(others)} as atypical (one test of the largest deviation of them all)"
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


def score_bounds(calibration: np.ndarray, alpha: float, tail: Tails = "two-sided") -> tuple[float | None, float | None]:
    """Score bounds (low, high) equivalent to p <= alpha for one model, read off the calibration scores.

    `calibration` is (J, n): the score's calibration scores first, then its
    guard's. The rule's p-value (`typicality_p_values`) of a score s, with the
    guard at its median, never rises as s moves out from the median, and
    changes only just past a calibration score or where s's deviation passes
    a calibration image's; p <= alpha needs at most k = floor(alpha (n+1)) - 1
    bag members ahead, so the bound is one of those few points past the k + 1
    most extreme scores, each checked by the p-value itself. Exact without a
    guard; with one, the bound of the score alone (the guard can flag an image
    whatever its score).
    """
    if not 0 < alpha < 1:
        raise ConfigError(f"the false-positive rate must be in (0, 1), got {alpha}")
    cal = np.atleast_2d(np.asarray(calibration, dtype=np.float64))
    n = cal.shape[1]
    tails = tails_of(tail, len(cal))
    k = math.floor(alpha * (n + 1) + 1e-9) - 1  # bag members allowed ahead of the image
    if k < 0:
        return None, None
    others = [float(np.median(c)) for c in cal[1:]]
    srt = np.sort(cal[0])
    bounds: list[float | None] = []
    for sign in (1.0, -1.0):
        if sign < 0 and tails[0] == "upper":
            bounds.append(None)
            continue
        extreme = srt[-(k + 2) :] if sign > 0 else srt[: k + 2]
        q = bag_quantiles(cal[0], np.array([sign * math.inf]))[0]
        # Where s's deviation passes that of a calibration image among the most extreme ones.
        qs = [q, *(bag_quantiles(c, np.array([v]))[0] for c, v in zip(cal[1:], others, strict=True))]
        d = np.max([deviation(c, qj, t) for c, qj, t in zip(cal, qs, tails, strict=True)], axis=0)
        d = np.sort(d)[-(len(cal) * 2 * (k + 2)) :]
        low, high = side_scales(q)
        m = float(q[MEDIAN])
        scale = float(high if sign > 0 else low)
        crossings = m + sign * d * scale
        points = np.concatenate([extreme, crossings])
        # Just past each point; a computed crossing may be a few units in the last place short of it, in
        # units of the deviation's own arithmetic (m - s is rounded at the size of |m| + |s|, not of s:
        # a score near 0 moved by its own ulps never changes a deviation near 1).
        unit = np.spacing(np.abs(points) + abs(m) + abs(scale))
        # Past a calibration score itself, the count moves at the very next float (a score near 0 has
        # ulps far below the deviation's units): that point is a candidate too.
        past = np.nextafter(extreme, sign * math.inf)
        candidates = np.unique(np.concatenate([past, *(points + sign * j * unit for j in range(8))]))
        candidates = candidates[sign * (candidates - m) > 0]
        if len(candidates) == 0:
            bounds.append(None)
            continue
        new = np.stack([candidates, *(np.full(len(candidates), v) for v in others)])[None]
        p = typicality_p_values(cal, np.zeros(n, np.int64), new, tail)
        hit = candidates[p <= alpha + 1e-12]
        bounds.append(None if len(hit) == 0 else float(hit.min() if sign > 0 else hit.max()))
    return bounds[1], bounds[0]


def tail_bounds(
    calibration: np.ndarray, model: TailModel, level: float, tail: str
) -> tuple[float | None, float | None]:
    """The scores beyond which the tail model gives p <= level (the guard typical): where (1) of
    `tail_model` equals the level, mapped from the deviation back to the score on each side."""
    from scipy.stats import genpareto

    share = level * (model.n + 1) / model.exceedances
    if not 0 < share < 1:
        return None, None
    d = model.threshold + float(genpareto.isf(share, model.shape, scale=model.scale))
    cal = np.atleast_2d(calibration)[0]
    q_high = bag_quantiles(cal, np.array([math.inf]))[0]
    q_low = bag_quantiles(cal, np.array([-math.inf]))[0]
    high = float(q_high[MEDIAN] + d * side_scales(q_high)[1])
    return (float(q_low[MEDIAN] - d * side_scales(q_low)[0]) if tail == "two-sided" else None), high


def auto_threshold(calibration: np.ndarray, alpha: float, tail: Tails = "two-sided") -> Threshold:
    """The `auto` rule at level alpha with its score bounds (`score_bounds`); `tail` is the score's, or
    one per statistic of the test."""
    low, high = score_bounds(calibration, alpha, tail)
    return Threshold("auto", tails_of(tail, len(np.atleast_2d(calibration)))[0], alpha, low, high, alpha)


def fdr_threshold(
    calibration: np.ndarray,
    p: np.ndarray,
    q: float,
    tail: Tails = "two-sided",
    *,
    models: int = 1,
    guard: str | None = None,
) -> Threshold:
    """The Benjamini-Hochberg rule at level q over this batch's p-values, with its score bounds.

    Score bounds exist only for one model: K cross-fitted models give flags
    that no single score bound reproduces.
    """
    _, cutoff = benjamini_hochberg(p, q)
    low = high = None
    if cutoff is not None and models == 1:
        low, high = score_bounds(calibration, min(cutoff, 1 - 1e-12), tail)
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
