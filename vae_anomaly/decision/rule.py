"""The decision rule: from p-values to flags, with its floor, its words and its guarantee.

`DecisionRule` is the one rule `score`, `evaluate`, `merge` and the report
writers apply: a score, an optional guard statistic, a tail, and either the
`auto` rule (flag p <= fpr), Benjamini-Hochberg at a false discovery rate, or
a raw score threshold. The score, its guard and the image-property checks
(`checks.py`), each on the side(s) its model file stores, are combined into one
statistic calibrated once (`combination.py`), so the smallest exact
p-value is 1/(n+1) for n calibration images; below it, a tail model
(`tail_model.py`) gives approximate p-values, and the guarantee says so. It is
validated once, on construction; the floor, the rule's text and its guarantee
all come from it (`thresholds.py` holds what it flags at). No torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CalibrationError, ConfigError
from ..images.properties import BY_NAME
from ..model.features import SCORE_SIDE
from ..model.features import weights as feature_weights
from ..model.score_table import DEFAULT_GUARD, DEFAULT_SCORE, GUARDS, SCORE_NAMES
from ..validation import check_choice, check_float
from .calibration import TAILS, Calibration, calibration_needed, smallest_p_value
from .checks import PREFIX
from .tail_model import TailModel, covers
from .thresholds import Threshold, auto_threshold, fdr_threshold, flag, score_threshold, tail_bounds

if TYPE_CHECKING:
    from ..model.inference import ScoreResult


def _percent(rate: float) -> str:
    """A rate in percent, two significant digits: 0.01 -> "1%", 1/91 -> "1.1%"."""
    return f"{100 * rate:.2g}%"


def cross_conformal_bound(alpha: float, n: int, k: int) -> float:
    """What K-fold cross-conformal p-values provably keep at level alpha with n calibration images:
    2 alpha + min(2 (1 - 1/K) / (n/K + 1), (1 - K/n) / (K + 1)) (Barber et al. 2021, Theorem 4, CV+)."""
    return min(1.0, 2 * alpha + min(2 * (1 - 1 / k) / (n / k + 1), (1 - k / n) / (k + 1)))


def guarantee(threshold: Threshold, n_calibration: int) -> str:
    """The decision rule's error guarantee, in one plain sentence: the rate that actually holds.

    One model: exact (full conformal). K cross-fitted models: cross-conformal
    p-values (Vovk 2015) hold about their level in practice (benchmarks/small_sets.py
    measures it) but are proven only within `cross_conformal_bound`, and the
    sentence says so.
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
        else f"cross-conformal over {threshold.models} models: about {a} in practice, provably at most "
        f"{cross_conformal_bound(threshold.alpha, n_calibration, threshold.models):.3g}"
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
    p-value of their combined evidence (`combination.py`), exact
    whatever the dependence between the two, with floor 1/(n+1). A guard
    equal to the score, or None, means no guard.
    """

    score: str = DEFAULT_SCORE
    guard: str | None = DEFAULT_GUARD
    tail: str | None = None  # the score's and guard's side; None: the model's (features.SCORE_SIDE)
    threshold: str | float = "auto"
    fpr: float = 0.01
    fdr: float | None = None
    # Below the smallest reachable p-value, flag at that floor (the default; the rate that holds is
    # stated) or, strict, flag nothing at the level asked for (`--strict-fpr`).
    strict: bool = False
    # The image-property checks and the local statistic (checks.py, local.py) join the one test, each
    # on its own side, where the model file calibrated them; measured to help (benchmarks/README.md, "Checks",
    # "Local defects"). False: the model's statistics alone.
    checks: bool = True
    statistics: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_choice("score", self.score, SCORE_NAMES)
        if self.guard is not None:
            check_choice("guard", self.guard, GUARDS)
        if self.tail is not None:
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
        if not isinstance(self.checks, bool):
            raise ConfigError(f"checks must be True or False, got {self.checks!r}")
        guard = None if self.guard in (None, self.score) else self.guard
        object.__setattr__(self, "guard", guard)
        object.__setattr__(self, "statistics", (self.score,) if guard is None else (self.score, guard))

    def statistics_in(self, calibration: Calibration) -> tuple[str, ...]:
        """The statistics of the one test: the score, the guard and, with checks, every property the
        model file calibrated and tests (`Calibration.sides`; older files have none, or no sides)."""
        if not self.checks:
            return self.statistics
        return self.statistics + tuple(k for k in calibration.scores if self._side(k, calibration) is not None)

    @staticmethod
    def _side(key: str, calibration: Calibration) -> str | None:
        """A calibrated check's side(s) in the test: as the model file stored them, else (files written
        before) the property's own `decided`; None where it is not tested (or not a check)."""
        if not key.startswith(PREFIX):
            return None
        name = key[len(PREFIX) :]
        if calibration.sides is not None:
            return calibration.sides.get(name)
        return BY_NAME[name].decided if name in BY_NAME else "two-sided"

    def resolved(self, features: str) -> DecisionRule:
        """The rule with its tail made explicit for a model of this kind (reports state the side used)."""
        return self if self.tail is not None else replace(self, tail=SCORE_SIDE.get(features, "two-sided"))

    def tail_for(self, calibration: Calibration) -> str:
        """The score's and the guard's side: the rule's, else the model's (two-sided for pixels)."""
        return self.tail or SCORE_SIDE.get(calibration.features, "two-sided")

    def tails_for(self, stats: Sequence[str], calibration: Calibration) -> tuple[str, ...]:
        """The tail of each of the test's statistics: the rule's (or the model's) for the score and the
        guard, each check's own (`_side`)."""
        n = len(self.statistics)
        own = self.tail_for(calibration)
        return (own,) * n + tuple(self._side(s, calibration) or "two-sided" for s in stats[n:])

    @staticmethod
    def weights_for(stats: Sequence[str], calibration: Calibration) -> tuple[float, ...] | None:
        """Each statistic's weight in the combination (`features.weights`; None: all 1)."""
        return feature_weights(calibration.features, len(stats), len(calibration.of(stats[0])))

    @property
    def level(self) -> float:
        return self.fpr if self.fdr is None else self.fdr

    def _raised(self, level: float, n_calibration: int, by_tail_model: bool) -> float:
        """The level, or the floor where it is below it. Strict: flag nothing below the floor. Only
        Benjamini-Hochberg keeps its level below the floor, from the tail model's p-values (its first
        cut-off, q/m, lies far below any floor); a p <= fpr rule flags at the floor, where the images
        beyond every normal one lie, and says so (`unreachable`)."""
        if self.strict or (by_tail_model and covers(n_calibration)):
            return level
        return max(level, self.floor(n_calibration))

    def applied(self, n_calibration: int) -> float:
        """The level flags are decided at: the one asked for, or, where n calibration scores cannot
        reach it and the rule is not strict, the smallest reachable p-value (the floor); with --fdr,
        the tail model reaches below the floor where it covers n (`tail_model.covers`)."""
        return self._raised(self.level, n_calibration, self.fdr is not None)

    def applied_fpr(self, n_calibration: int) -> float:
        """The per-image level of the binomial batch test: --fpr, raised to the floor like the rule."""
        return self._raised(self.fpr, n_calibration, False)

    def floor(self, n_calibration: int) -> float:
        """The smallest p-value: 1/(n+1), one test whatever the tail and the guard."""
        return smallest_p_value(n_calibration)

    def p_values(
        self,
        calibration: Calibration,
        scores: np.ndarray,
        model_scores: np.ndarray | None = None,
        guard_scores: np.ndarray | None = None,
        guard_model_scores: np.ndarray | None = None,
        checked: Mapping[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """The rule's p-value of each image: one conformal test of the score and, with a guard, the
        guard together, and with checks every calibrated property (`checked`: name -> values, see
        `checks.values`) (`typicality_p_values`). `score`, `Detector.p_values` and `merge` (which
        recomputes every shard's p-values) all call this one."""
        if len(scores) == 0:  # an empty shard: nothing to test (and no property values to test it on)
            return np.zeros(0)
        values: list[np.ndarray] = [scores]
        per_model: list[np.ndarray | None] = [model_scores]
        if self.guard is not None:
            if guard_scores is None:
                raise ConfigError(f"the rule has the guard {self.guard!r}, but no guard scores were given")
            values.append(guard_scores)
            per_model.append(guard_model_scores)
        stats = self.statistics_in(calibration)
        for name in stats[len(self.statistics) :]:
            check = name[len(PREFIX) :]
            if checked is None or check not in checked:
                raise ConfigError(
                    f"the rule tests the image property {check!r} with the model, but no such values were given; "
                    "score files through Detector.score, or decide with checks=False (--no-checks)"
                )
            v = np.asarray(checked[check], dtype=np.float64)
            values.append(v)
            per_model.append(None if calibration.models == 1 else np.repeat(v[None], calibration.models, axis=0))
        return calibration.p_values(
            stats,
            values,
            per_model,
            self.tails_for(stats, calibration),
            exact=self.strict,
            weights=self.weights_for(stats, calibration),
        )

    def threshold_for(
        self,
        p: np.ndarray,
        calibration: np.ndarray,
        tails: Sequence[str],
        models: int = 1,
        tail_model: TailModel | None = None,
        weights: Sequence[float] | None = None,
    ) -> Threshold:
        """The rule as applied to a batch with these p-values: cut-off and, where they exist, score bounds.

        `calibration` is (J, n), as `Calibration.stacked(stats)` gives for the test's statistics
        (`statistics_in`), `tails` theirs (`tails_for`); `tail_model` is the one the p-values used.
        K cross-fitted models have no single score bound: none is computed."""
        if self.threshold != "auto":
            return score_threshold(float(self.threshold))
        calibration = np.atleast_2d(calibration)
        level = self.applied(calibration.shape[1])
        requested = None if level == self.level else self.level
        bounds = models == 1
        if self.fdr is not None:
            rule = fdr_threshold(calibration, p, level, tails, models=models, guard=self.guard, weights=weights)
        else:
            rule = auto_threshold(calibration, level, tails, bounds=bounds, weights=weights)
        floor = self.floor(calibration.shape[1])
        cutoff = rule.p_cutoff
        if tail_model is not None and cutoff is not None and cutoff < floor:
            rule = replace(rule, tail_model=tail_model.to_dict())
            if rule.rule == "auto" and models == 1:
                low, high = tail_bounds(calibration, tail_model, cutoff, tails, weights)
                rule = replace(rule, low=low, high=high)
        if models > 1:
            rule = replace(rule, low=None, high=None, models=models)
        checks = len(calibration) - len(self.statistics)
        return replace(rule, guard=self.guard, requested=requested, checks=checks)

    def unreachable(self, n_calibration: int, models: int = 1) -> str | None:
        """The warning, said once and plainly, when n calibration scores cannot reach the level asked
        for; else None."""
        need = calibration_needed(self.level)
        if self.threshold != "auto" or n_calibration >= need:
            return None
        floor = self.floor(n_calibration)
        refit = (
            "add normal images and re-fit"
            if models > 1
            else "re-fit with more normal images, a larger --calibration-fraction or --folds 5"
        )
        option = "--fpr" if self.fdr is None else "--fdr"
        if self.fdr is not None and covers(n_calibration) and not self.strict:
            return (
                f"with {n_calibration} normal calibration images exact p-values stop at {_percent(floor)}; below it "
                f"they come from a tail model, so the false discovery rate {_percent(self.level)} is approximate. "
                f"For an exact rate {refit} (at least {need}), or pass --strict-fpr."
            )
        head = f"with {n_calibration} normal calibration images no image can be flagged at {_percent(self.level)}"
        if self.strict:
            return (
                f"{head}; nothing will be flagged (--strict-fpr). To flag, {refit} (at least {need}) or raise {option}."
            )
        return (
            f"{head}; flagging at {_percent(floor)}, the smallest rate these images allow. To flag at "
            f"{_percent(self.level)}, {refit} (at least {need}); --strict-fpr flags nothing instead."
        )

    def decision(
        self, scores: np.ndarray, p: np.ndarray, calibration: Calibration, warnings: Sequence[str] = ()
    ) -> Decision:
        """The rule applied to a batch, from its scores and the rule's p-values (`p_values`)."""
        stats = self.statistics_in(calibration)
        cal = calibration.stacked(stats)
        n = cal.shape[1]
        tails = self.tails_for(stats, calibration)
        weights = self.weights_for(stats, calibration)
        threshold = self.threshold_for(p, cal, tails, calibration.models, weights=weights)
        if not self.strict and threshold.p_cutoff is not None and threshold.p_cutoff < self.floor(n):
            # Below the floor the tail model decides; fitted only then (SciPy's import alone costs ~0.5 s).
            tail_model = calibration.tail_model(stats, tails, weights)
            threshold = self.threshold_for(p, cal, tails, calibration.models, tail_model, weights)
        flags = flag(scores, p, threshold)
        return Decision(p, flags, threshold, n, list(warnings), self.floor(n), guarantee(threshold, n))

    def decide(
        self,
        calibration: Calibration,
        result: ScoreResult,
        calibrated_samples: int,
        checked: Mapping[str, np.ndarray] | None = None,
    ) -> Decision:
        """Conformal p-values of a scored batch against the calibration scores, and its flags.

        `checked` are the images' property values (`checks.values`), which the one test takes in
        where the rule has checks and the model file calibrated them."""
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
            checked,
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
            "checks": self.checks,
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
            checks=bool(options.get("checks", False)),  # shards written before the checks had none
        )
