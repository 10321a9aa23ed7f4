"""`score`: list, decode, score, decide, reach the verdict, and write every output asked for.

config = ScoreConfig(inputs=(Path("incoming"),), model=Path("model.vae"))
run = score_report(config)
sys.exit(run.report.return_code)
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..decision import checks
from ..decision.gate import GateRule
from ..decision.rule import Decision, DecisionRule
from ..detector import Detector
from ..errors import ConfigError
from ..images.batching import DecodeOptions
from ..images.duplicates import Duplicate
from ..images.listing import real_path
from ..model.inference import HeatMaps, ScoreResult
from ..model.score_table import MAX_SAMPLES
from ..reports import outputs, visualize
from ..reports.outputs import Outputs
from ..reports.report import FORMATS, ImageRecord, Report
from ..reports.shard import Shard, scoring_options, select_shard, shard_report
from ..reports.verdict import ScoredBatch, Verdict, reasons, verdict
from ..validation import check_device, check_int
from .common import Say, check_gate, quiet, resolved


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
        object.__setattr__(self, "outputs", resolved(self.outputs))
        self.outputs.check(self.model, self.inputs)
        check_gate(self.gate, self.baseline)
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


def score_report(config: ScoreConfig, *, on_message: Say = quiet, on_warning: Say = quiet) -> ScoreRun:
    """List, decode, score, decide, reach the verdict (batch tests, reasons, gate), write every output."""
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
    decision = detector.decide(result, rule)
    for w in [*result.warnings, *decision.warnings]:
        on_warning(w)
    report = _verdict(config, detector, result, decision, rule, duplicates, shard)
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
    wanted = outputs.pictured(report, config.outputs)
    outputs.pictures(
        report,
        decision.threshold,
        config.outputs,
        calibration=detector.calibration_[rule.score],
        maps=heat_maps(detector, wanted, rule.score, config.samples, config.batch_size),
        model=str(config.model),
        inputs=", ".join(map(str, config.inputs)),
        on_message=on_message,
        on_warning=on_warning,
    )
    # A shard's flags and verdict are about part of the batch: the merge job annotates and summarises.
    run.annotations = outputs.ci_outputs(report, config.outputs.junit, shard is None, on_message, on_warning)
    return run


def _verdict(
    config: ScoreConfig,
    detector: Detector,
    result: ScoreResult,
    decision: Decision,
    rule: DecisionRule,
    duplicates: Sequence[Duplicate | None],
    shard: Shard | None,
) -> Report:
    """The batch as the verdict step takes it (`reports.verdict`, which `merge` ends with too).

    `merge` decides the flags again over the whole batch, at a cut-off never above the rule's level
    (Benjamini-Hochberg's is at most q): a shard explains every image at p <= that level, keeping its
    findings at that level, and merge picks the reasons at its own cut-off."""
    threshold, facts = decision.threshold, result.facts
    level = threshold.alpha if shard is not None and threshold.rule != "score" else None
    cutoff = threshold.p_cutoff if level is None else level
    chosen = decision.flags if level is None else decision.p_values <= level + 1e-12
    found = detector.explain(result, decision, range(len(result.paths)), cutoff)
    batch = ScoredBatch(
        result.paths,
        result.scores,
        [(e.path, e.reason) for e in result.errors],
        detector.calibration_[rule.score],
        score=rule.score,
        samples=result.samples,
        ignored=result.ignored,
        fingerprint=detector.fingerprint,
        models=detector.n_models,
        model_scores=result.model_scores if detector.n_models > 1 else None,
        findings=found,
        atypical=[f[: checks.ATYPICAL] for f in found],
        duplicates=duplicates,
        regions=None if facts is None or facts.regions is None else list(facts.regions),
        tiles=None if facts is None or facts.tiles is None else list(facts.tiles),
        warnings=[*result.warnings, *decision.warnings],
    )
    asked = Verdict(config.gate, config.skip_unreadable, config.baseline)
    return verdict(batch, decision, rule, asked, explained=reasons(found, chosen, cutoff))


def heat_maps(
    detector: Detector, records: Sequence[ImageRecord], score: str, samples: int | None, batch_size: int
) -> Iterator[tuple[Sequence[ImageRecord], HeatMaps]]:
    """The heat maps of `records`, a batch at a time (memory stays bounded): computed here, once each,
    and handed to the writers (`outputs.pictures`)."""
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        yield chunk, detector.heatmap([real_path(r.path) for r in chunk], score=score, samples=samples)
