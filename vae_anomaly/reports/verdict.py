"""The verdict on a scored batch: batch tests, each flagged image's reasons, the report and its gate.

`score` and `merge` both end here, so that a sharded run and an unsharded one reach their verdict by the
same steps: `merge` recomputes the scores' p-values and the decision over the union, then hands over
what `score` would have had.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..decision.batch_tests import BatchTest, run_batch_tests
from ..decision.checks import Reason, kept
from ..decision.gate import GateRule, evaluate_gate
from ..decision.rule import Decision, DecisionRule
from ..images.duplicates import Duplicate
from .documents import load_baseline
from .report import Report, build_report

Box = Sequence[int] | None


@dataclass
class ScoredBatch:
    """A batch's scores and what was found of each readable image, in the order of `paths`."""

    paths: list[str]
    scores: np.ndarray
    errors: list[tuple[str, str]]  # (path, why) of each unreadable file
    calibration: np.ndarray  # the score's calibration values
    score: str
    samples: int
    ignored: int
    fingerprint: str | None
    models: int
    model_scores: np.ndarray | None  # (K, N) with K > 1 cross-fitted models, else None
    findings: Sequence[Sequence[Reason]]  # every image's findings, most atypical first (Detector.explain)
    atypical: Sequence[Sequence[Reason]]
    duplicates: Sequence[Duplicate | None]
    regions: Sequence[Box] | None = None
    tiles: Sequence[Box] | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Verdict:
    """What the verdict is asked: the gate, the unreadable-file policy, a previous batch to compare with."""

    gate: tuple[GateRule, ...] = ()
    skip_unreadable: bool = False
    baseline: Path | None = None


def reasons(findings: Sequence[Sequence[Reason]], chosen: np.ndarray, cutoff: float | None) -> list[list[Reason]]:
    """Each chosen image's reasons at the cut-off (checks.kept); none for the others."""
    return [kept(f, cutoff) if chosen[i] else [] for i, f in enumerate(findings)]


def verdict(
    batch: ScoredBatch,
    decision: Decision,
    rule: DecisionRule,
    asked: Verdict,
    *,
    explained: Sequence[Sequence[Reason]] | None = None,
) -> Report:
    """Batch tests (shift, drift against `asked.baseline`, exceedance), each flagged image's reasons at
    the decision's cut-off, and the report with the gate's verdict. `explained`: reasons picked by the
    caller instead (a shard keeps every image that merge could flag)."""
    baseline = None
    if asked.baseline is not None:
        baseline = load_baseline(asked.baseline, batch.fingerprint, batch.score)
    tests = run_batch_tests(
        batch.scores,
        decision.p_values,
        batch.calibration,
        fpr=rule.applied_fpr(decision.n_calibration),
        model_scores=batch.model_scores,
        baseline=baseline,
    )
    if explained is None:
        explained = reasons(batch.findings, decision.flags, decision.threshold.p_cutoff)
    report = build_report(
        batch.paths,
        batch.scores,
        batch.errors,
        decision,
        calibration=batch.calibration,
        score=batch.score,
        samples=batch.samples,
        ignored=batch.ignored,
        fingerprint=batch.fingerprint,
        skip_unreadable=asked.skip_unreadable,
        warnings=batch.warnings,
        tests=tests,
        models=batch.models,
        baseline=None if asked.baseline is None else os.fsdecode(asked.baseline),
        reasons=explained,
        atypical=batch.atypical,
        duplicates=batch.duplicates,
        regions=batch.regions,
        tiles=batch.tiles,
    )
    return judge(report, asked.gate, tests)


def judge(report: Report, gate: Sequence[GateRule], tests: dict[str, BatchTest] | None = None) -> Report:
    """The gate's rules against the report's counts and batch tests: each with its value, limit and verdict,
    and the exit code that follows."""
    s = report.summary
    counts = {"duplicates": s.duplicates, "leaks": s.leaks}
    s.gate = evaluate_gate(list(gate), s.flagged, s.scored, tests, counts)
    s.gate_passed = all(c.passed for c in s.gate)
    s.exit_code = report.return_code
    return report
