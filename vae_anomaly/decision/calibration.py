"""Conformal p-values from held-out normal scores (Vovk et al. 2005; Bates et al. 2023).

The calibration scores s_1..s_n come from normal images the model never
trained on. If a new normal image's score is exchangeable with them, its
conformal p-value is uniform, so flagging p <= alpha flags at most a
fraction alpha of normal images. `decision.py` turns p-values into flags;
`batch_tests.py` tests whole batches. No torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..errors import CalibrationError, ConfigError
from . import combination
from .combination import SIDES, Evidence
from .tail_model import TailModel, at_floor, covers, fit_tail, refine

Tail = Literal["two-sided", "upper"]
TAILS: tuple[str, ...] = ("two-sided", "upper")  # the score's (--tail)
# One tail for every statistic of a test, or one per statistic (the score's, then the guard's and the
# property checks', each on the side(s) the model file stored: `combination.SIDES`).
Tails = str | Sequence[str]


def tails_of(tail: Tails, n_stats: int) -> list[str]:
    """Each statistic's tail; one string applies to all."""
    out = [tail] * n_stats if isinstance(tail, str) else list(tail)
    if len(out) != n_stats or any(t not in SIDES for t in out):
        raise ConfigError(f"tails must be {n_stats} of {', '.join(SIDES)}, got {tail!r}")
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


def combined_p_values(
    calibration: np.ndarray,
    folds: np.ndarray,
    model_scores: np.ndarray,
    tail: Tails = "two-sided",
    weights: Sequence[float] | None = None,
) -> np.ndarray:
    """One conformal p-value per image for J statistics taken together (`combination.p_values`):
    (J, n) calibration values, (n,) the model of each, (K, J, m) the new images' values under each
    model; one tail for all statistics or one each, and each one's weight (None: all 1)."""
    cal = np.atleast_2d(np.asarray(calibration, dtype=np.float64))
    if cal.shape[1] == 0:
        raise CalibrationError("no calibration scores: the model file holds none for this score")
    scores = np.asarray(model_scores, dtype=np.float64)
    folds = np.asarray(folds)
    if scores.ndim != 3 or scores.shape[1] != len(cal) or scores.shape[0] != int(folds.max()) + 1:
        models = int(folds.max()) + 1
        raise ValueError(f"scores of shape {scores.shape} given for {len(cal)} statistics, {models} models")
    return combination.p_values(cal, folds, scores, tails_of(tail, len(cal)), weights)[0]


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
    # The side(s) of each image check the decision tests, as the model file stored them when it was
    # fitted (`properties.Property.decided`); None: a file written before they were stored.
    sides: Mapping[str, str] | None = None
    # What the model's VAE models ("pixels" or "backbone", features.py): how the decision weighs its score.
    features: str = "pixels"
    # Tail models fitted so far, by (statistics, tail): a decision asks twice (p-values, guarantee).
    _tails: dict[tuple[tuple[str, ...], tuple[str, ...], tuple[float, ...] | None], TailModel | None] = field(
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

    def tail_model(
        self, names: Sequence[str], tail: Tails = "two-sided", weights: Sequence[float] | None = None
    ) -> TailModel | None:
        """The tail model (`tail_model.fit_tail`) of the calibration images' combined statistic T, where n
        is in its range."""
        key = (tuple(names), tuple(tails_of(tail, len(names))), None if weights is None else tuple(weights))
        if key not in self._tails:
            cal = self.stacked(names)
            own = Evidence.of(cal, key[1], weights).members(np.arange(cal.shape[1]))  # T of each in its own bag
            self._tails[key] = fit_tail(own) if covers(cal.shape[1]) else None
        return self._tails[key]

    def p_values(
        self,
        names: Sequence[str],
        scores: Sequence[np.ndarray],
        model_scores: Sequence[np.ndarray | None],
        tail: Tails = "two-sided",
        *,
        exact: bool = False,
        weights: Sequence[float] | None = None,
    ) -> np.ndarray:
        """One conformal p-value per image for the statistics `names` together (`combination.p_values`).

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
        p, evidence = combination.p_values(cal, folds, per_model, tails_of(tail, len(cal)), weights)
        if exact or not np.any(at_floor(p, cal.shape[1])):
            return p  # no image at the floor: nothing for the tail model to refine (nor to fit it for)
        model = self.tail_model(names, tail, weights)
        return p if model is None else refine(p, cal.shape[1], evidence, model)
