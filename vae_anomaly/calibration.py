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


def decision_statistic(calibration: np.ndarray, scores: np.ndarray, tail: str = "two-sided") -> np.ndarray:
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

    rule "auto": flag p <= alpha; `low` and `high` are the equivalent score
    bounds (flag below `low` or above `high`), None where no score reaches them.
    rule "score": flag score >= `high`, a raw threshold chosen by the user.
    """

    rule: str
    tail: str
    alpha: float | None
    low: float | None
    high: float | None

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
        where = " or ".join(bounds) if bounds else "no score (too few calibration images)"
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
    return Threshold("auto", tail, alpha, low, high)


def score_threshold(value: float) -> Threshold:
    return Threshold("score", "upper", None, None, float(value))


def flag(scores: np.ndarray, p: np.ndarray, threshold: Threshold) -> np.ndarray:
    """Boolean flags under the chosen rule."""
    if threshold.rule == "score":
        return np.asarray(scores) >= threshold.high
    return np.asarray(p) <= threshold.alpha + 1e-12
