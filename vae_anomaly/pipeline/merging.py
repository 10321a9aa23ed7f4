"""`merge`: the shard reports of `score --shard I/N` joined into the report one run would have written."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..decision.gate import GateRule
from ..decision.rule import DecisionRule
from ..detector import Detector
from ..errors import ConfigError
from ..reports import outputs
from ..reports.merge import load_shard_report, merge_reports
from ..reports.outputs import Outputs
from ..reports.report import FORMATS, Report
from .common import Say, check_gate, quiet, resolved


@dataclass(frozen=True)
class MergeConfig:
    """Every option of `merge`."""

    reports: tuple[Path, ...]
    model: Path | None = None  # also check the shards' model fingerprint against this file
    # The rule merge applies: its own options, never a shard's (the shards must have been scored with it).
    rule: DecisionRule = field(default_factory=DecisionRule)
    gate: tuple[GateRule, ...] = ()
    baseline: Path | None = None
    skip_unreadable: bool = False
    outputs: Outputs = field(default_factory=Outputs)

    def __post_init__(self) -> None:
        if not self.reports:
            raise ConfigError("no shard reports given: pass every shard-*.json of the run")
        if self.outputs.format not in FORMATS:
            raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {self.outputs.format!r}")
        object.__setattr__(self, "outputs", resolved(self.outputs))
        # A --baseline may be replaced by this run's report on purpose (a rolling baseline): not refused.
        self.outputs.check(self.model, self.reports)
        check_gate(self.gate, self.baseline)


@dataclass
class MergeRun:
    report: Report
    stdout: str | None = None
    annotations: list[str] = field(default_factory=list)


def merge(config: MergeConfig, *, on_message: Say = quiet, on_warning: Say = quiet) -> MergeRun:
    """Join the shard reports of `score --shard I/N` into the report one run would have written, and gate it."""
    model = None if config.model is None else Detector.load(config.model, device="cpu")
    shards = []
    for path in config.reports:
        size = os.stat(path).st_size if os.path.isfile(path) else 0
        if size > 32 << 20:  # a large report takes a while to read and validate: say so
            on_message(f"reading {os.fsdecode(path)} ({size / 2**20:,.0f} MiB)")
        shards.append(load_shard_report(path))
    report = merge_reports(
        shards,
        rule=config.rule,
        gate=list(config.gate),
        skip_unreadable=config.skip_unreadable,
        baseline=config.baseline,
        model_fingerprint=None if model is None else model.fingerprint,
        model_calibration=None if model is None else model.calibration,
    )
    for w in report.warnings:
        on_warning(w)
    for r in report.records:
        if r.error is not None:
            on_message(f"unreadable: {r.path}: {r.error}")
    s = report.summary
    on_message(f"merged {len(shards)} shard reports: {s.scored} of {s.total} images scored")
    run = MergeRun(report, outputs.report_text(report, config.outputs, on_message))
    run.annotations = outputs.ci_outputs(report, config.outputs.junit, True, on_message, on_warning)
    return run
