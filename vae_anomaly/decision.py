"""The decision rule: from p-values to flags, with its floor, its words and its guarantee.

`DecisionRule` is the one rule `score`, `evaluate`, `merge` and the report
writers apply: a score, an optional guard statistic, a tail, and either the
`auto` rule (flag p <= fpr), Benjamini-Hochberg at a false discovery rate, or
a raw score threshold. It is validated once, on construction; the smallest
reachable p-value, the Bonferroni factor of the guard, the rule's text and
its guarantee all come from it. No torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .calibration import TAILS, Calibration, calibration_needed, smallest_p_value
from .config import DEFAULT_GUARD, DEFAULT_SCORE, GUARDS, SCORE_NAMES, check_choice, check_float
from .errors import CalibrationError, ConfigError

if TYPE_CHECKING:
    from .inference import ScoreResult


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
    # The level asked for, where it was below the smallest reachable p-value and `alpha` was raised
    # to that floor (see DecisionRule.applied); None where alpha is the level asked for.
    requested: float | None = None

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
        raised = "" if self.requested is None else f" (the smallest reachable level; {self.requested:g} was asked for)"
        if self.rule == "fdr":
            cut = "none" if self.p_cutoff is None else f"{self.p_cutoff:.4g}"
            return (
                f"fdr: Benjamini-Hochberg at q = {self.alpha:.4g}{raised} over {self.tail} conformal p "
                f"(cut-off {cut}), i.e. {where}"
            )
        return f"auto: conformal {self.tail} p <= {self.alpha:.4g}{raised}, i.e. {where}"


def auto_threshold(calibration: np.ndarray, alpha: float, tail: str = "two-sided") -> Threshold:
    """Score bounds equivalent to p <= alpha, read off the calibration scores.

    p_high <= a holds when at most k = floor(a (n+1)) - 1 calibration scores
    are >= s, i.e. for s above the (k+1)-th largest; likewise for p_low.
    """
    if not 0 < alpha < 1:
        raise ConfigError(f"the false-positive rate must be in (0, 1), got {alpha}")
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
    """The decision rule's error guarantee, in one plain sentence: the rate that actually holds."""
    raised = (
        ""
        if threshold.requested is None
        else f" The {threshold.requested:g} asked for is below the smallest p-value the calibration can give."
    )
    if threshold.rule == "fdr":
        return (
            f"Benjamini-Hochberg at {threshold.alpha:.4g}: the expected share of false alarms among flagged "
            f"images is at most {threshold.alpha:.4g}.{raised}"
        )
    if threshold.rule == "auto":
        return (
            f"Each normal image is flagged with probability at most {threshold.alpha:.4g} (conformal p <= alpha)."
            + raised
        )
    return "A raw score threshold: no error rate is guaranteed."


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
    statistic, p = min(1, 2 min(p_score, p_guard)) (Bonferroni): a valid
    p-value whatever the dependence between the two statistics. A guard equal
    to the score, or None, means no guard.
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
    def tests(self) -> int:
        """How many tests share the level (Bonferroni): 2 with a guard, else 1."""
        return len(self.statistics)

    @property
    def level(self) -> float:
        return self.fpr if self.fdr is None else self.fdr

    def _raised(self, level: float, n_calibration: int) -> float:
        return level if self.strict else max(level, self.floor(n_calibration))

    def applied(self, n_calibration: int) -> float:
        """The level flags are decided at: the one asked for, or, where n calibration scores cannot
        reach it and the rule is not strict, the smallest reachable p-value (the floor)."""
        return self._raised(self.level, n_calibration)

    def applied_fpr(self, n_calibration: int) -> float:
        """The per-image level of the binomial batch test: --fpr, raised to the floor like the rule."""
        return self._raised(self.fpr, n_calibration)

    def floor(self, n_calibration: int) -> float:
        """The smallest p-value: 1/(n+1), 2/(n+1) two-sided, times 2 with a guard."""
        return min(1.0, self.tests * smallest_p_value(n_calibration, self.tail))

    def p_values(
        self,
        calibration: Calibration,
        scores: np.ndarray,
        model_scores: np.ndarray | None = None,
        guard_scores: np.ndarray | None = None,
        guard_model_scores: np.ndarray | None = None,
    ) -> np.ndarray:
        """The rule's p-value of each image: the score's conformal p-value, or with a guard the
        Bonferroni combination p = min(1, 2 min(p_score, p_guard)). `score`, `Detector.p_values` and
        `merge` (which recomputes every shard's p-values) all call this one."""
        p_score = calibration.p_values(self.score, scores, model_scores, self.tail)
        if self.guard is None:
            return np.asarray(p_score, dtype=np.float64)
        if guard_scores is None:
            raise ConfigError(f"the rule has the guard {self.guard!r}, but no guard scores were given")
        p_guard = calibration.p_values(self.guard, guard_scores, guard_model_scores, self.tail)
        combined: np.ndarray = np.minimum(1.0, 2.0 * np.minimum(p_score, p_guard))
        return combined

    def threshold_for(self, p: np.ndarray, calibration: np.ndarray, models: int = 1) -> Threshold:
        """The rule as applied to a batch with these p-values: cut-off and, where they exist, score bounds."""
        if self.threshold != "auto":
            return score_threshold(float(self.threshold))
        level = self.applied(len(calibration))
        requested = None if level == self.level else self.level
        if self.fdr is not None:
            rule = fdr_threshold(calibration, p, level, self.tail, models=models, guard=self.guard)
        else:
            # Score bounds of the main test at its Bonferroni share of the level.
            bounds = auto_threshold(calibration, level / self.tests, self.tail)
            rule = replace(bounds, alpha=level, p_cutoff=level)
        if models > 1:
            rule = replace(rule, low=None, high=None, models=models)
        return replace(rule, guard=self.guard, requested=requested)

    def unreachable(self, n_calibration: int, models: int = 1) -> str | None:
        """The warning when n calibration scores cannot reach the level asked for, else None."""
        need = calibration_needed(self.level / self.tests, self.tail)
        if self.threshold != "auto" or n_calibration >= need:
            return None
        refit = (
            "Add normal images and re-fit"
            if models > 1
            else "Re-fit with more normal images, a larger --calibration-fraction or --folds 5"
        )
        option = "--fpr" if self.fdr is None else "--fdr"
        head = f"{n_calibration} calibration scores cannot reach p <= {self.level:g} ({self.tail}); at least {need} are"
        if self.strict:
            return f"{head} needed, so nothing will be flagged (--strict-fpr). {refit}, or raise {option}."
        return (
            f"{head} needed, so images are flagged at the smallest reachable level, {self.applied(n_calibration):.4g}, "
            f"and that is the rate that holds. {refit}, or pass --strict-fpr to flag nothing below {option} "
            f"{self.level:g}."
        )

    def decision(
        self,
        scores: np.ndarray,
        p: np.ndarray,
        calibration: np.ndarray,
        models: int = 1,
        warnings: Sequence[str] = (),
    ) -> Decision:
        """The rule applied to a batch, from its scores and the rule's p-values (`p_values`)."""
        threshold = self.threshold_for(p, calibration, models)
        n, flags = len(calibration), flag(scores, p, threshold)
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
        cal = calibration.of(self.score)
        warning = self.unreachable(len(cal), calibration.models)
        warnings += [warning] if warning else []
        return self.decision(result.scores, p, cal, calibration.models, warnings)

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
