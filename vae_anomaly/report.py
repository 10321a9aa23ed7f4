"""Per-image records, the run summary, the gate, and the machine-readable writers.

The JSON document is a stable, versioned schema:

    {"schema": "vae-anomaly/score", "schema_version": 1,
     "summary": {...}, "records": [{"rank", "path", "score", "p_value", "flagged", "error"}, ...]}

Records come most anomalous first (by the decision's own statistic), then
the unreadable files.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .calibration import Threshold, decision_statistic

SCHEMA_NAME = "vae-anomaly/score"
SCHEMA_VERSION = 1
FORMATS: tuple[str, ...] = ("table", "json", "jsonl", "csv")


@dataclass(frozen=True)
class ImageRecord:
    rank: int | None  # 1 = most anomalous; None for unreadable files
    path: str
    score: float | None
    p_value: float | None
    flagged: bool | None
    error: str | None = None


@dataclass(frozen=True)
class GateRule:
    """One limit of the gate: `max-anomalies` (a count) or `max-anomaly-rate` (a fraction)."""

    name: str
    limit: float


@dataclass(frozen=True)
class GateCheck:
    name: str
    limit: float
    value: float
    passed: bool


@dataclass
class Summary:
    total: int  # image files seen
    scored: int
    flagged: int
    unreadable: int
    ignored: int  # hidden and non-image files skipped in folders
    score: str
    samples: int
    threshold: dict[str, Any]
    rule: str  # the decision rule in words
    calibration_images: int
    model_fingerprint: str | None
    skip_unreadable: bool
    gate: list[GateCheck] = field(default_factory=list)
    gate_passed: bool = True
    exit_code: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Report:
    """Everything `score` produces. `return_code` is the process exit code:

    0  every input read and scored; the gate, if any, passed
    1  the gate failed (too many anomalies); wins over 3, since the batch must stop either way
    3  some inputs could not be read (listed with reasons), unless skip_unreadable
    (2, usage errors, never reaches a report: the CLI exits before scoring.)
    """

    records: list[ImageRecord]
    summary: Summary
    warnings: list[str] = field(default_factory=list)

    @property
    def return_code(self) -> int:
        if not self.summary.gate_passed:
            return 1
        if self.summary.unreadable and not self.summary.skip_unreadable:
            return 3
        return 0


def evaluate_gate(rules: list[GateRule], flagged: int, scored: int) -> list[GateCheck]:
    checks = []
    for r in rules:
        if r.name == "max-anomalies":
            value = float(flagged)
        elif r.name == "max-anomaly-rate":
            value = flagged / scored if scored else 0.0
        else:
            raise ValueError(f"unknown gate rule {r.name!r}")
        checks.append(GateCheck(r.name, r.limit, value, value <= r.limit + 1e-12))
    return checks


def build_report(
    paths: list[str],
    scores: np.ndarray,
    p: np.ndarray,
    flags: np.ndarray,
    errors: list[tuple[str, str]],
    *,
    threshold: Threshold,
    calibration: np.ndarray,
    score: str,
    samples: int,
    ignored: int,
    fingerprint: str | None,
    gate: list[GateRule],
    skip_unreadable: bool,
    warnings: list[str] | None = None,
) -> Report:
    # Most anomalous first, by the decision's own statistic (a raw threshold ranks by score).
    tail = "upper" if threshold.rule == "score" else threshold.tail
    order = np.argsort(-decision_statistic(calibration, scores, tail), kind="stable")
    records = [
        ImageRecord(rank + 1, paths[i], float(scores[i]), float(p[i]), bool(flags[i])) for rank, i in enumerate(order)
    ]
    records += [ImageRecord(None, path, None, None, None, reason) for path, reason in errors]
    n_flagged = int(np.sum(flags))
    checks = evaluate_gate(gate, n_flagged, len(scores))
    summary = Summary(
        total=len(paths) + len(errors),
        scored=len(scores),
        flagged=n_flagged,
        unreadable=len(errors),
        ignored=ignored,
        score=score,
        samples=samples,
        threshold=threshold.to_dict(),
        rule=threshold.describe(),
        calibration_images=len(calibration),
        model_fingerprint=fingerprint,
        skip_unreadable=skip_unreadable,
        gate=checks,
        gate_passed=all(c.passed for c in checks),
    )
    report = Report(records, summary, list(warnings or []))
    summary.exit_code = report.return_code
    return report


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null rather than invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def to_json(report: Report) -> str:
    doc = {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "summary": report.summary.to_dict(),
        "warnings": report.warnings,
        "records": [asdict(r) for r in report.records],
    }
    return json.dumps(_clean(doc), indent=2) + "\n"


def to_jsonl(report: Report) -> str:
    """One image record a line (`"type": "image"`), then one `"type": "summary"` line."""
    lines = [json.dumps(_clean({"type": "image", **asdict(r)})) for r in report.records]
    lines.append(
        json.dumps(
            _clean(
                {"type": "summary", "schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, **report.summary.to_dict()}
            )
        )
    )
    return "\n".join(lines) + "\n"


def to_csv(report: Report) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rank", "path", "score", "p_value", "flagged", "error"])
    for r in report.records:
        w.writerow(
            [
                "" if r.rank is None else r.rank,
                r.path,
                "" if r.score is None else repr(r.score),
                "" if r.p_value is None else repr(r.p_value),
                "" if r.flagged is None else str(r.flagged).lower(),
                r.error or "",
            ]
        )
    return buf.getvalue()


WRITERS = {"json": to_json, "jsonl": to_jsonl, "csv": to_csv}
