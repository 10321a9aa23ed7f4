"""From inputs to a gated report: what `score`, `merge` and `fit` do, as library functions.

    config = ScoreConfig(inputs=(Path("incoming"),), model=Path("model.vae"))
    run = score_report(config)
    sys.exit(run.report.return_code)

The CLI builds one config object from its options, calls one function here,
renders the report, and exits with `report.return_code`. Everything a user
sees is computed here or below; messages go through `on_message` (progress,
files written) and `on_warning`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from .decision import checks
from .decision.gate import GateRule
from .decision.rule import Decision, DecisionRule
from .detector import Detector
from .errors import ConfigError
from .images.batching import DecodeOptions
from .model import distributed
from .model.inference import ScoreResult
from .model.score_table import MAX_SAMPLES
from .reports import outputs, visualize
from .reports.documents import load_baseline
from .reports.merge import load_shard_report, merge_reports
from .reports.outputs import Outputs
from .reports.report import FORMATS, Report, build_report
from .reports.shard import Shard, scoring_options, select_shard, shard_report
from .validation import check_device, check_int

Say = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


@dataclass(frozen=True)
class ScoreConfig:
    """Every option of `score`, validated on construction; only this travels past the CLI's parser."""

    inputs: tuple[Path, ...]
    model: Path
    rule: DecisionRule = field(default_factory=DecisionRule)
    samples: int | None = None  # Monte Carlo samples of the score; None: the model's calibration
    gate: tuple[GateRule, ...] = ()
    baseline: Path | None = None
    skip_unreadable: bool = False
    batch_size: int = 256
    device: str = "auto"
    shard: tuple[int, int] | None = None  # (I, N): score only the I-th of N parts of the listing
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    outputs: Outputs = field(default_factory=Outputs)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("no inputs: give folders or image files to score")
        check_int("samples", self.samples, 1, MAX_SAMPLES, none=True)
        check_int("batch_size", self.batch_size, 1, 1 << 20)
        check_device(self.device)
        check_int("html_top", self.outputs.html_top, 0)
        if self.outputs.format not in FORMATS:
            raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {self.outputs.format!r}")
        object.__setattr__(self, "outputs", _resolved(self.outputs))
        self.outputs.check(self.model, self.inputs)
        _check_gate(self.gate, self.baseline)
        if self.shard is not None:
            index, count = self.shard
            if not 1 <= index <= count:
                raise ConfigError(f"shard must be I/N with 1 <= I <= N, got {index}/{count}")
            if self.gate:
                raise ConfigError(
                    "--shard scores part of the batch, and the gate is decided over all of it: drop --gate, "
                    "--max-anomalies and --max-anomaly-rate here and pass them to "
                    "`vae-anomaly merge shard-*.json --gate ...`"
                )
            if self.outputs.format != "json":
                raise ConfigError(
                    "--shard writes a JSON report for `vae-anomaly merge`: add --format json and "
                    f"--output shard-{index}.json"
                )


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
        object.__setattr__(self, "outputs", _resolved(self.outputs))
        # A --baseline may be replaced by this run's report on purpose (a rolling baseline): not refused.
        self.outputs.check(self.model, self.reports)
        _check_gate(self.gate, self.baseline)


def _resolved(out: Outputs) -> Outputs:
    fmt = outputs.output_format(out.output, out.format)
    return replace(out, format=fmt)


def _check_gate(gate: tuple[GateRule, ...], baseline: Path | None) -> None:
    if any(r.name == "drift-p" for r in gate) and baseline is None:
        raise ConfigError("gate rule drift-p compares with a previous batch: pass --baseline previous.json")


@dataclass
class ScoreRun:
    """What one `score` run produced: the report, and what it was made from."""

    report: Report
    detector: Detector
    result: ScoreResult
    decision: Decision
    seconds: float
    shard: Shard | None = None
    stdout: str | None = None  # the machine-readable report, when it goes to stdout
    annotations: list[str] = field(default_factory=list)  # GitHub workflow commands, for stderr


def score_report(config: ScoreConfig, *, on_message: Say = _quiet, on_warning: Say = _quiet) -> ScoreRun:
    """List, decode, score, decide, test the batch, gate, and write every output asked for."""
    if config.outputs.pictures:
        visualize.check_available()  # before scoring 100,000 images, not after
    detector = Detector.load(config.model, device=config.device, decode=config.decode)
    rule = config.rule.resolved(detector.calibration.features)
    t0 = time.perf_counter()
    shard = None if config.shard is None else select_shard(list(config.inputs), *config.shard)
    result = detector.score(
        list(config.inputs) if shard is None else shard.listing,
        score=rule.score,
        samples=config.samples,
        batch_size=config.batch_size,
        guard=rule.guard,
        on_warning=on_warning,
    )
    duplicates = detector.duplicates(result)  # part of scoring: the timing below includes the search
    seconds = time.perf_counter() - t0
    baseline = None
    if config.baseline is not None:
        baseline = load_baseline(config.baseline, detector.fingerprint, rule.score)
    decision = detector.decide(result, rule)
    for w in [*result.warnings, *decision.warnings]:
        on_warning(w)
    fpr = rule.applied_fpr(decision.n_calibration)
    tests = detector.batch_tests(result, decision, fpr=fpr, baseline=baseline)
    # `merge` decides the flags again over the whole batch, at a cut-off never above the rule's level
    # (Benjamini-Hochberg's is at most q): a shard explains every image at p <= that level, keeping its
    # findings at that level, and merge picks the reasons at its own cut-off.
    threshold = decision.threshold
    level = threshold.alpha if shard is not None and threshold.rule != "score" else None
    cutoff = threshold.p_cutoff if level is None else level
    chosen = decision.flags if level is None else decision.p_values <= level + 1e-12
    found = detector.explain(result, decision, range(len(result.paths)), cutoff)
    atypical = [f[: checks.ATYPICAL] for f in found]
    reasons = [checks.kept(f, cutoff) if chosen[i] else [] for i, f in enumerate(found)]
    report = build_report(
        result.paths,
        result.scores,
        [(e.path, e.reason) for e in result.errors],
        decision,
        calibration=detector.calibration_[rule.score],
        score=rule.score,
        samples=result.samples,
        ignored=result.ignored,
        fingerprint=detector.fingerprint,
        gate=list(config.gate),
        skip_unreadable=config.skip_unreadable,
        warnings=[*result.warnings, *decision.warnings],
        tests=tests,
        models=detector.n_models,
        baseline=None if config.baseline is None else os.fsdecode(config.baseline),
        reasons=reasons,
        atypical=atypical,
        duplicates=duplicates,
        regions=None if result.facts is None or result.facts.regions is None else list(result.facts.regions),
        tiles=None if result.facts is None or result.facts.tiles is None else list(result.facts.tiles),
    )
    of_listing = ""
    if shard is not None:
        report = shard_report(
            report,
            shard,
            options=scoring_options(rule, result.samples),
            result=result,
            calibration=detector.calibration,
            decision_warnings=decision.warnings,
            checked=detector.checked(result) if rule.checks else None,
            near_bits=detector.near_bits,
        )
        of_listing = f" (shard {shard.index}/{shard.count} of a listing of {shard.total})"
    for e in result.errors:
        on_message(f"unreadable: {e.path}: {e.reason}")
    n = len(result.paths) + len(result.errors)
    rate = len(result.paths) / max(seconds, 1e-9)
    on_message(f"scored {len(result.paths)} of {n} images{of_listing} in {seconds:.2f} s ({rate:,.0f} images/s)")
    run = ScoreRun(report, detector, result, decision, seconds, shard)
    run.stdout = outputs.report_text(report, config.outputs, on_message)
    outputs.pictures(
        detector,
        report,
        decision.threshold,
        config.outputs,
        score=rule.score,
        samples=config.samples,
        batch_size=config.batch_size,
        model=str(config.model),
        inputs=", ".join(map(str, config.inputs)),
        on_message=on_message,
        on_warning=on_warning,
    )
    # A shard's flags and verdict are about part of the batch: the merge job annotates and summarises.
    run.annotations = outputs.ci_outputs(report, config.outputs.junit, shard is None, on_message, on_warning)
    return run


@dataclass
class MergeRun:
    report: Report
    stdout: str | None = None
    annotations: list[str] = field(default_factory=list)


def merge(config: MergeConfig, *, on_message: Say = _quiet, on_warning: Say = _quiet) -> MergeRun:
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


def fit_summary(detector: Detector, output: Path, seconds: float, world: distributed.World) -> str:
    """The line `fit` ends with: what was trained on what, the smallest reachable p-value, the fingerprint."""
    tr = detector.metadata_["training"]
    k = detector.n_models
    if k > 1:
        how = (
            f"{k} cross-fitted models, each on {tr['train_images']} training and {tr['validation_images']} "
            f"validation images; all {tr['calibration_images']} images calibrate (each scored by the model "
            "that did not see it)"
        )
    else:
        how = (
            f"{tr['train_images']} training, {tr['validation_images']} validation, {tr['calibration_images']} "
            f"calibration images; {tr['epochs_run']} epochs ({tr['stopped']}, best epoch {tr['best_epoch']})"
        )
    if world.size > 1:
        how += f"; trained by {world.size} processes"
    floor = detector.smallest_p_value(DecisionRule().score)
    return (
        f"wrote {os.fsdecode(output)}: {how}; smallest reachable p-value {floor:.4g}; {seconds:.1f} s; "
        f"fingerprint {detector.fingerprint}"
    )
