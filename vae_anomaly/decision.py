"""The decision rule: from p-values to flags, with its floor, its words and its guarantee.

`DecisionRule` is the one rule `score`, `evaluate`, `merge` and the report
writers apply: a score, an optional guard statistic, a tail, and either the
`auto` rule (flag p <= fpr), Benjamini-Hochberg at a false discovery rate, or
a raw score threshold. The score and its guard, on both sides, are taken into
one conformal test (`calibration.typicality_p_values`), so the smallest
reachable p-value is 1/(n+1) for n calibration images. It is validated once,
on construction; the floor, the rule's text and its guarantee all come from
it. No torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .calibration import (
    TAILS,
    Calibration,
    bag_quantiles,
    calibration_needed,
    deviation,
    smallest_p_value,
    typicality_p_values,
)
from .config import DEFAULT_GUARD, DEFAULT_SCORE, GUARDS, SCORE_NAMES, check_choice, check_float
from .errors import CalibrationError, ConfigError
from .tail_model import TailModel, covers

if TYPE_CHECKING:
    from .inference import ScoreResult


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
            where += f", or {self.guard} as atypical (one test of the larger deviation of the two)"
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


def score_bounds(calibration: np.ndarray, alpha: float, tail: str = "two-sided") -> tuple[float | None, float | None]:
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
    k = math.floor(alpha * (n + 1) + 1e-9) - 1  # bag members allowed ahead of the image
    if k < 0:
        return None, None
    others = [float(np.median(c)) for c in cal[1:]]
    srt = np.sort(cal[0])
    bounds: list[float | None] = []
    for sign in (1.0, -1.0):
        if sign < 0 and tail == "upper":
            bounds.append(None)
            continue
        extreme = srt[-(k + 2) :] if sign > 0 else srt[: k + 2]
        q = bag_quantiles(cal[0], np.array([sign * math.inf]))[0]
        # Where s's deviation passes that of a calibration image among the most extreme ones.
        qs = [q, *(bag_quantiles(c, np.array([v]))[0] for c, v in zip(cal[1:], others, strict=True))]
        d = np.max([deviation(c, qj, tail) for c, qj in zip(cal, qs, strict=True)], axis=0)
        d = np.sort(d)[-(len(cal) * 2 * (k + 2)) :]
        scale = (q[2] - q[1]) if sign > 0 else (q[1] - q[0])
        crossings = q[1] + sign * d * max(scale, 1e-9 * max(1.0, abs(q[1])))
        points = np.concatenate([extreme, crossings])
        # Just past each point; a computed crossing may be a few units in the last place short of it.
        nudged = [points]
        for _ in range(6):
            nudged.append(np.nextafter(nudged[-1], sign * math.inf))
        candidates = np.unique(np.concatenate(nudged))
        candidates = candidates[sign * (candidates - q[1]) > 0]
        if len(candidates) == 0:
            bounds.append(None)
            continue
        new = np.stack([candidates, *(np.full(len(candidates), v) for v in others)])[None]
        p = typicality_p_values(cal, np.zeros(n, np.int64), new, tail)
        hit = candidates[p <= alpha + 1e-12]
        bounds.append(None if len(hit) == 0 else float(hit.min() if sign > 0 else hit.max()))
    return bounds[1], bounds[0]


def _tail_bounds(
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
    _, m, q3 = bag_quantiles(cal, np.array([math.inf]))[0]
    q1, m_low, _ = bag_quantiles(cal, np.array([-math.inf]))[0]
    tiny = 1e-9 * max(1.0, abs(m))
    high = float(m + d * max(q3 - m, tiny))
    return (float(m_low - d * max(m_low - q1, tiny)) if tail == "two-sided" else None), high


def auto_threshold(calibration: np.ndarray, alpha: float, tail: str = "two-sided") -> Threshold:
    """The `auto` rule at level alpha with its score bounds (`score_bounds`)."""
    low, high = score_bounds(calibration, alpha, tail)
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

    Score bounds exist only for one model: K cross-fitted models give flags
    that no single score bound reproduces.
    """
    _, cutoff = benjamini_hochberg(p, q)
    low = high = None
    if cutoff is not None and models == 1:
        low, high = score_bounds(calibration, min(cutoff, 1 - 1e-12), tail)
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


def guarantee(threshold: Threshold) -> str:
    """The decision rule's error guarantee, in one plain sentence: the rate that actually holds.

    One model: exact (full conformal). K cross-fitted models: cross-conformal
    p-values (Vovk 2015) hold their level in practice (benchmarks/small_sets.py
    measures it) but are proven only within 2 alpha (Barber et al. 2021, CV+),
    and the sentence says so.
    """
    raised = (
        ""
        if threshold.requested is None
        else f" The {threshold.requested:g} asked for is below the smallest p-value the calibration can give."
    )
    if threshold.rule not in ("fdr", "auto") or threshold.alpha is None:
        return "A raw score threshold: no error rate is guaranteed."
    a = f"{threshold.alpha:.4g}"
    kind = (
        "exact, conformal"
        if threshold.models == 1
        else f"cross-conformal over {threshold.models} models: about {a} in practice, provably within about "
        f"{min(1.0, 2 * threshold.alpha):.4g}"
    )
    tm = threshold.tail_model
    if tm is not None:
        kind = (
            f"approximate: tail model, n = {tm['n']}; exact conformal p-values stop at 1/(n+1) = "
            f"{1 / (tm['n'] + 1):.4g}, below it {TailModel(**tm).describe()}"
        )
        a = f"about {a}"
    if threshold.rule == "fdr":
        return (
            f"Benjamini-Hochberg at {a}: the expected share of false alarms among flagged images is at most "
            f"{a} ({kind}).{raised}"
        )
    return f"Each normal image is flagged with probability at most {a} ({kind}).{raised}"


@dataclass(frozen=True)
class Decision:
    """p-values and flags of a scored batch under one rule, and what the rule can promise."""

    p_values: np.ndarray
    flags: np.ndarray
    threshold: Threshold
    n_calibration: int
    warnings: list[str]
    floor: float  # the smallest p-value this calibration and rule can give
    guarantee: str  # the rule's error guarantee, one plain sentence


@dataclass(frozen=True)
class DecisionRule:
    """How images are flagged. Validated on construction; `decide` applies it.

    threshold "auto" flags p <= fpr, or, with `fdr` = q, runs Benjamini-Hochberg
    at level q over the batch; a number flags scores >= it. With a guard
    statistic, the score and the guard are one test: p is the conformal
    p-value of the larger of their deviations (`typicality_p_values`), exact
    whatever the dependence between the two, with floor 1/(n+1). A guard
    equal to the score, or None, means no guard.
    """

    score: str = DEFAULT_SCORE
    guard: str | None = DEFAULT_GUARD
    tail: str = "two-sided"
    threshold: str | float = "auto"
    fpr: float = 0.01
    fdr: float | None = None
    # Below the smallest reachable p-value, flag at that floor (the default; the rate that holds is
    # stated) or, strict, flag nothing at the level asked for (`--strict-fpr`).
    strict: bool = False
    statistics: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_choice("score", self.score, SCORE_NAMES)
        if self.guard is not None:
            check_choice("guard", self.guard, GUARDS)
        check_choice("tail", self.tail, TAILS)
        if self.threshold != "auto":
            if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
                raise ConfigError(f"threshold must be 'auto' or a number, got {self.threshold!r}")
            check_float("threshold", self.threshold, -math.inf, math.inf, lo_open=True, hi_open=True)
            if self.fdr is not None:
                raise ConfigError("--fdr chooses the flags itself; drop --threshold NUMBER, or drop --fdr")
        check_float("fpr", self.fpr, 0, 1, lo_open=True, hi_open=True)
        check_float("fdr", self.fdr, 0, 1, lo_open=True, hi_open=True, none=True)
        if not isinstance(self.strict, bool):
            raise ConfigError(f"strict must be True or False, got {self.strict!r}")
        guard = None if self.guard in (None, self.score) else self.guard
        object.__setattr__(self, "guard", guard)
        object.__setattr__(self, "statistics", (self.score,) if guard is None else (self.score, guard))

    @property
    def level(self) -> float:
        return self.fpr if self.fdr is None else self.fdr

    def _raised(self, level: float, n_calibration: int) -> float:
        if self.strict or covers(n_calibration):  # strict: flag nothing below the floor; else the tail model
            return level
        return max(level, self.floor(n_calibration))

    def applied(self, n_calibration: int) -> float:
        """The level flags are decided at: the one asked for, or, where n calibration scores cannot
        reach it, no tail model covers n (`tail_model.covers`) and the rule is not strict, the
        smallest reachable p-value (the floor)."""
        return self._raised(self.level, n_calibration)

    def applied_fpr(self, n_calibration: int) -> float:
        """The per-image level of the binomial batch test: --fpr, raised to the floor like the rule."""
        return self._raised(self.fpr, n_calibration)

    def floor(self, n_calibration: int) -> float:
        """The smallest p-value: 1/(n+1), one test whatever the tail and the guard."""
        return smallest_p_value(n_calibration)

    def calibration_of(self, calibration: Calibration) -> np.ndarray:
        """The (J, n) calibration scores of the rule's statistics, the score first."""
        return np.stack([np.asarray(calibration.of(name), dtype=np.float64) for name in self.statistics])

    def p_values(
        self,
        calibration: Calibration,
        scores: np.ndarray,
        model_scores: np.ndarray | None = None,
        guard_scores: np.ndarray | None = None,
        guard_model_scores: np.ndarray | None = None,
    ) -> np.ndarray:
        """The rule's p-value of each image: one conformal test of the score and, with a guard, the
        guard together (`typicality_p_values`). `score`, `Detector.p_values` and `merge` (which
        recomputes every shard's p-values) all call this one."""
        if self.guard is None:
            return calibration.p_values([self.score], [scores], [model_scores], self.tail, exact=self.strict)
        if guard_scores is None:
            raise ConfigError(f"the rule has the guard {self.guard!r}, but no guard scores were given")
        return calibration.p_values(
            [self.score, self.guard],
            [scores, guard_scores],
            [model_scores, guard_model_scores],
            self.tail,
            exact=self.strict,
        )

    def threshold_for(
        self, p: np.ndarray, calibration: np.ndarray, models: int = 1, tail_model: TailModel | None = None
    ) -> Threshold:
        """The rule as applied to a batch with these p-values: cut-off and, where they exist, score bounds.

        `calibration` is (J, n), as `calibration_of` gives; `tail_model` the one the p-values used."""
        if self.threshold != "auto":
            return score_threshold(float(self.threshold))
        calibration = np.atleast_2d(calibration)
        level = self.applied(calibration.shape[1])
        requested = None if level == self.level else self.level
        if self.fdr is not None:
            rule = fdr_threshold(calibration, p, level, self.tail, models=models, guard=self.guard)
        else:
            rule = auto_threshold(calibration, level, self.tail)
        floor = self.floor(calibration.shape[1])
        cutoff = rule.p_cutoff
        if tail_model is not None and cutoff is not None and cutoff < floor:
            rule = replace(rule, tail_model=tail_model.to_dict())
            if rule.rule == "auto" and models == 1:
                low, high = _tail_bounds(calibration, tail_model, cutoff, self.tail)
                rule = replace(rule, low=low, high=high)
        if models > 1:
            rule = replace(rule, low=None, high=None, models=models)
        return replace(rule, guard=self.guard, requested=requested)

    def unreachable(self, n_calibration: int, models: int = 1) -> str | None:
        """The warning when n calibration scores cannot reach the level asked for, else None."""
        need = calibration_needed(self.level)
        if self.threshold != "auto" or n_calibration >= need:
            return None
        if covers(n_calibration) and not self.strict:
            return (
                f"{n_calibration} calibration images give exact p-values down to 1/(n+1) = "
                f"{self.floor(n_calibration):.4g}; below it they come from a tail model, so the rate "
                f"{self.level:g} is approximate. Add normal images (at least {need} for an exact rate), or pass "
                f"--strict-fpr to flag only on exact p-values (nothing below {self.floor(n_calibration):.4g})."
            )
        refit = (
            "Add normal images and re-fit"
            if models > 1
            else "Re-fit with more normal images, a larger --calibration-fraction or --folds 5"
        )
        option = "--fpr" if self.fdr is None else "--fdr"
        head = f"{n_calibration} calibration scores cannot reach p <= {self.level:g}; at least {need} are"
        if self.strict:
            return f"{head} needed, so nothing will be flagged (--strict-fpr). {refit}, or raise {option}."
        return (
            f"{head} needed, so images are flagged at the smallest reachable level, {self.applied(n_calibration):.4g}, "
            f"and that is the rate that holds. {refit}, or pass --strict-fpr to flag nothing below {option} "
            f"{self.level:g}."
        )

    def decision(
        self, scores: np.ndarray, p: np.ndarray, calibration: Calibration, warnings: Sequence[str] = ()
    ) -> Decision:
        """The rule applied to a batch, from its scores and the rule's p-values (`p_values`)."""
        cal = self.calibration_of(calibration)
        tail_model = None if self.strict else calibration.tail_model(self.statistics, self.tail)
        threshold = self.threshold_for(p, cal, calibration.models, tail_model)
        n, flags = cal.shape[1], flag(scores, p, threshold)
        return Decision(p, flags, threshold, n, list(warnings), self.floor(n), guarantee(threshold))

    def decide(self, calibration: Calibration, result: ScoreResult, calibrated_samples: int) -> Decision:
        """Conformal p-values of a scored batch against the calibration scores, and its flags."""
        if result.score != self.score:
            raise ConfigError(f"the rule decides on {self.score!r} scores, but {result.score!r} scores were given")
        for name in self.statistics:
            calibration.of(name)
        guard = result.guard if self.guard is not None else None
        if self.guard is not None and (guard is None or guard.score != self.guard):
            raise ConfigError(f"the rule needs the guard's {self.guard!r} scores of the same images")
        warnings: list[str] = []
        if result.samples != calibrated_samples:
            if self.threshold == "auto":
                raise CalibrationError(
                    f"the model was calibrated with {calibrated_samples} sample(s) for {self.score!r}, but "
                    f"{result.samples} were asked for; p-values need the same count. Drop --samples, or pass "
                    "a numeric --threshold"
                )
            warnings.append(
                f"p-values are approximate: calibrated with {calibrated_samples} samples, scored with {result.samples}"
            )
        p = self.p_values(
            calibration,
            result.scores,
            result.model_scores,
            None if guard is None else guard.scores,
            None if guard is None else guard.model_scores,
        )
        warning = self.unreachable(len(calibration.of(self.score)), calibration.models)
        warnings += [warning] if warning else []
        return self.decision(result.scores, p, calibration, warnings)

    def options(self) -> dict[str, Any]:
        """The rule as JSON data (shard reports carry it; `from_options` reads it back)."""
        return {
            "score": self.score,
            "guard": "none" if self.guard is None else self.guard,
            "tail": self.tail,
            "threshold": self.threshold,
            "fpr": self.fpr,
            "fdr": self.fdr,
            "strict_fpr": self.strict,
        }

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> DecisionRule:
        guard = options.get("guard")
        return cls(
            score=options["score"],
            guard=None if guard in (None, "none") else guard,
            tail=options["tail"],
            threshold=options["threshold"],
            fpr=options["fpr"],
            fdr=options.get("fdr"),
            strict=bool(options.get("strict_fpr", False)),
        )
