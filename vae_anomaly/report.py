"""Per-image records, the run summary, the gate, and the machine-readable writers.

The JSON document is a stable, versioned schema, described by the JSON
Schema file `schemas/score-report.schema.json` shipped in this package:

    {"schema": "vae-anomaly/score", "schema_version": 1,
     "summary": {...}, "warnings": [...],
     "records": [{"rank", "path", "score", "p_value", "flagged", "error"}, ...]}

Records come most anomalous first (by the decision's own statistic), then
the unreadable files. CI writers: JUnit XML (one test case per image), a
GitHub step summary in Markdown, and GitHub `::warning` annotations.

A shard's report (`score --shard I/N`) adds optional fields for `merge`: a
top-level "shard" block and each record's "index" (and "model_scores"); see
shard.py. Other reports do not carry them.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .calibration import BatchTest, Threshold, decision_statistic

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
    # Shard reports only (`score --shard`), for `merge`; left out of the JSON when None:
    index: int | None = None  # position in the whole sorted listing, 0-based
    model_scores: tuple[float, ...] | None = None  # the score under each of K cross-fitted models


OPTIONAL_RECORD_FIELDS = ("index", "model_scores")


def record_dict(r: ImageRecord) -> dict[str, Any]:
    """A record as JSON data; the shard-only fields appear only in shard reports."""
    d = asdict(r)
    for key in OPTIONAL_RECORD_FIELDS:
        if d[key] is None:
            del d[key]
    return d


# Gate rules: name -> (what is measured, how it fails). Counts and rates fail
# above their limit; p-value rules fail at or below theirs, so a normal batch
# fails a `*-p=a` rule with probability at most a.
GATE_RULES: dict[str, tuple[str, str]] = {
    "max-count": ("number of flagged images", "value > limit"),
    "max-rate": ("share of scored images flagged", "value > limit"),
    "shift-p": ("Mann-Whitney p: batch scores above the calibration scores", "p <= limit"),
    "binom-p": ("p of the number of images at p <= --fpr, beta-binomial", "p <= limit"),
    "drift-p": ("Mann-Whitney p: batch scores above the --baseline report's", "p <= limit"),
}
GATE_ALIASES = {"max-anomalies": "max-count", "max-anomaly-rate": "max-rate"}


class GateSpecError(ValueError):
    """A --gate rule that cannot be parsed; the message lists the valid forms."""


@dataclass(frozen=True)
class GateRule:
    """One limit of the gate, e.g. GateRule("max-rate", 0.02) or GateRule("shift-p", 0.001)."""

    name: str
    limit: float


@dataclass(frozen=True)
class GateCheck:
    name: str
    limit: float
    value: float
    passed: bool
    fails_when: str = "value > limit"
    measures: str = ""


def parse_gate(specs: list[str] | tuple[str, ...]) -> list[GateRule]:
    """Rules from `--gate` values: repeatable, each `NAME=LIMIT` or a comma-separated list of them."""
    forms = ", ".join(f"{name}=LIMIT" for name in GATE_RULES)
    rules: list[GateRule] = []
    for spec in specs:
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, eq, raw = item.partition("=")
            name = GATE_ALIASES.get(name.strip(), name.strip())
            if not eq or name not in GATE_RULES:
                raise GateSpecError(
                    f"unknown gate rule {item!r}; use {forms} (e.g. --gate max-rate=0.02,shift-p=0.001)"
                )
            try:
                limit = float(raw)
            except ValueError:
                raise GateSpecError(f"gate rule {item!r}: the limit {raw.strip()!r} is not a number") from None
            if name == "max-count" and (limit < 0 or limit != int(limit)):
                raise GateSpecError(f"gate rule {item!r}: max-count takes a whole number >= 0")
            if name != "max-count" and not 0 <= limit <= 1:
                raise GateSpecError(f"gate rule {item!r}: {name} takes a number between 0 and 1")
            rules = [r for r in rules if r.name != name]  # the last one given wins
            rules.append(GateRule(name, int(limit) if name == "max-count" else limit))
    return rules


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
    guarantee: str = ""  # the rule's error guarantee, one plain sentence
    models: int = 1  # K cross-fitted models, or 1
    smallest_p_value: float | None = None  # the smallest p-value the calibration can give
    tests: dict[str, dict[str, Any]] = field(default_factory=dict)  # batch-level tests by name
    baseline: str | None = None  # the --baseline report compared with

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
    # Shard reports only: what `merge` needs to rebuild the whole run (see shard.py); JSON data.
    shard: dict[str, Any] | None = None

    @property
    def return_code(self) -> int:
        if not self.summary.gate_passed:
            return 1
        if self.summary.unreadable and not self.summary.skip_unreadable:
            return 3
        return 0


def evaluate_gate(
    rules: list[GateRule], flagged: int, scored: int, tests: dict[str, BatchTest] | None = None
) -> list[GateCheck]:
    """Every rule with its measured value and pass or fail."""
    tests = tests or {}
    by_rule = {"shift-p": "shift", "binom-p": "binomial", "drift-p": "drift"}
    checks = []
    for r in rules:
        name = GATE_ALIASES.get(r.name, r.name)
        if name not in GATE_RULES:
            raise ValueError(f"unknown gate rule {r.name!r}")
        measures, fails_when = GATE_RULES[name]
        if name == "max-count":
            value = float(flagged)
        elif name == "max-rate":
            value = flagged / scored if scored else 0.0
        else:
            test = tests.get(by_rule[name])
            if test is None:
                raise ValueError(f"gate rule {name} needs the {by_rule[name]} test, which was not run")
            value = test.p_value
        passed = value <= r.limit + 1e-12 if fails_when == "value > limit" else value > r.limit
        checks.append(GateCheck(name, r.limit, value, passed, fails_when, measures))
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
    tests: dict[str, BatchTest] | None = None,
    guarantee: str = "",
    models: int = 1,
    smallest_p_value: float | None = None,
    baseline: str | None = None,
) -> Report:
    # Most anomalous first, by the decision's own statistic (a raw threshold ranks by score).
    if threshold.rule == "score":
        order = np.argsort(-np.asarray(scores), kind="stable")
    else:
        order = np.argsort(-decision_statistic(calibration, scores, threshold.tail, p), kind="stable")
    records = [
        ImageRecord(rank + 1, paths[i], float(scores[i]), float(p[i]), bool(flags[i])) for rank, i in enumerate(order)
    ]
    records += [ImageRecord(None, path, None, None, None, reason) for path, reason in errors]
    n_flagged = int(np.sum(flags))
    checks = evaluate_gate(gate, n_flagged, len(scores), tests)
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
        guarantee=guarantee,
        models=models,
        smallest_p_value=smallest_p_value,
        tests={k: t.to_dict() for k, t in (tests or {}).items()},
        baseline=baseline,
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
    """The document indented for people, one record per line.

    Indenting every record would go through json's pure-Python encoder, about
    50 us a record (10 s for 200,000 images); one compact line each keeps the
    C encoder and stays easy to read and diff.
    """
    head: dict[str, Any] = {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "summary": report.summary.to_dict(),
        "warnings": report.warnings,
    }
    if report.shard is not None:
        head["shard"] = report.shard
    text = json.dumps(_clean(head), indent=2)
    records = ",\n".join("    " + json.dumps(_clean(record_dict(r))) for r in report.records)
    return f'{text[:-2]},\n  "records": [\n{records}\n  ]\n}}\n'


def to_jsonl(report: Report) -> str:
    """One image record a line (`"type": "image"`), then one `"type": "summary"` line."""
    lines = [json.dumps(_clean({"type": "image", **record_dict(r)})) for r in report.records]
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


# ---------------------------------------------------------------- JSON Schema
def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the `--format json` report, shipped in the package."""
    text = resources.files("vae_anomaly").joinpath("schemas/score-report.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


# ------------------------------------------------------------------- baseline
class BaselineError(ValueError):
    """A --baseline report that cannot be compared with this run; the message says why."""


def load_baseline(path: str | os.PathLike[str], fingerprint: str | None, score: str) -> np.ndarray:
    """The scores of a previous `--format json` report, checked to come from this model and score."""
    name = os.fsdecode(path)
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BaselineError(f"--baseline {name}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BaselineError(f"--baseline {name}: not a readable JSON report ({exc})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_NAME:
        raise BaselineError(
            f'--baseline {name}: not a vae-anomaly score report (no "schema": "{SCHEMA_NAME}"); '
            "write one with `vae-anomaly score ... --format json --output FILE`"
        )
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise BaselineError(
            f"--baseline {name}: report schema version {doc.get('schema_version')}, this vae-anomaly "
            f"reads {SCHEMA_VERSION}; score the baseline batch again"
        )
    summary = doc.get("summary") or {}
    theirs = summary.get("model_fingerprint")
    if theirs != fingerprint:
        raise BaselineError(
            f"--baseline {name}: scored by model {theirs}, but this run uses model {fingerprint}; scores of "
            "different models are not comparable. Score the baseline batch again with this model, or drop --baseline"
        )
    if summary.get("score") != score:
        raise BaselineError(
            f"--baseline {name}: holds {summary.get('score')!r} scores, this run computes {score!r}; "
            f"pass --score {summary.get('score')} or score the baseline batch again"
        )
    values = [r.get("score") for r in doc.get("records", []) if isinstance(r, dict)]
    scores = np.array([v for v in values if isinstance(v, (int, float))], dtype=np.float64)
    if len(scores) == 0:
        raise BaselineError(f"--baseline {name}: the report holds no scored images")
    return scores


# ------------------------------------------------------------------ CI writers
def _gate_line(c: GateCheck) -> str:
    op = "<=" if c.fails_when == "value > limit" else ">"
    return f"{c.name}: {c.value:.4g} {op} {c.limit:g} {'pass' if c.passed else 'FAIL'}"


def verdict_lines(report: Report) -> list[str]:
    """The verdict in plain text: the rule, its guarantee, every gate rule, the outcome."""
    s = report.summary
    lines = [
        f"{s.flagged} of {s.scored} scored images flagged, {s.unreadable} unreadable, {s.ignored} ignored",
        f"rule: {s.rule}",
        f"guarantee: {s.guarantee}",
    ]
    if s.smallest_p_value is not None:
        models = f"{s.models} cross-fitted models, " if s.models > 1 else ""
        lines.append(
            f"calibration: {models}{s.calibration_images} normal scores; smallest reachable p-value "
            f"{s.smallest_p_value:.4g}"
        )
    for t in s.tests.values():
        lines.append(f"test {t['name']}: p = {t['p_value']:.4g} ({t['detail']})")
    for c in s.gate:
        lines.append(f"gate {_gate_line(c)}")
    if s.gate:
        lines.append(f"verdict: gate {'PASSED' if s.gate_passed else 'FAILED'}, exit code {s.exit_code}")
    else:
        lines.append(f"verdict: no gate asked for, exit code {s.exit_code}")
    return lines


def to_junit(report: Report) -> str:
    """JUnit XML: one test case per image; flagged and unreadable images are failures.

    ElementTree escapes every name and message, so any file name is safe.
    """
    s = report.summary
    failures = sum(1 for r in report.records if r.flagged or r.error)
    root = ET.Element("testsuites", name="vae-anomaly", tests=str(len(report.records)), failures=str(failures))
    suite = ET.SubElement(
        root, "testsuite", name="vae-anomaly score", tests=str(len(report.records)), failures=str(failures), errors="0"
    )
    props = ET.SubElement(suite, "properties")
    for key, value in (
        ("rule", s.rule),
        ("guarantee", s.guarantee),
        ("model", s.model_fingerprint or ""),
        ("gate", "none" if not s.gate else ("passed" if s.gate_passed else "failed")),
        *((f"gate.{c.name}", _gate_line(c)) for c in s.gate),
        ("exit_code", str(s.exit_code)),
    ):
        ET.SubElement(props, "property", name=key, value=value)
    for r in report.records:
        case = ET.SubElement(suite, "testcase", classname="vae-anomaly", name=r.path)
        if r.error is not None:
            ET.SubElement(case, "failure", type="unreadable", message=f"unreadable: {r.error}").text = r.error
        elif r.flagged:
            msg = f"anomaly: score {r.score:.6g}, p-value {r.p_value:.4g}, rank {r.rank}"
            ET.SubElement(case, "failure", type="anomaly", message=msg).text = f"{msg}\nrule: {s.rule}"
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def github_escape_data(text: str) -> str:
    """Escape a workflow-command message: %, CR and LF (GitHub's `escapeData`)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def github_escape_property(text: str) -> str:
    """Escape a workflow-command property value: as data, plus ':' and ',' (`escapeProperty`)."""
    return github_escape_data(text).replace(":", "%3A").replace(",", "%2C")


def github_annotations(report: Report, limit: int = 50) -> list[str]:
    """`::warning file=PATH,title=...::message` lines for flagged and unreadable files.

    GitHub shows at most 10 warnings a step inline, so more than `limit` are
    summed up in one last line rather than flooding the log.
    """
    lines = []
    bad = [r for r in report.records if r.flagged or r.error]
    for r in bad[:limit]:
        if r.error is not None:
            title, msg = "unreadable image", f"{r.path}: {r.error}"
        else:
            title, msg = "anomalous image", f"{r.path}: score {r.score:.6g}, p-value {r.p_value:.4g} (rank {r.rank})"
        lines.append(
            f"::warning file={github_escape_property(r.path)},title={github_escape_property(title)}"
            f"::{github_escape_data(msg)}"
        )
    if len(bad) > limit:
        lines.append(f"::warning title=vae-anomaly::{len(bad) - limit} more flagged or unreadable images (see report)")
    return lines


def _md(text: str) -> str:
    """Markdown-safe table cell: pipes and backticks would break the table."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`").replace("\n", " ")


def github_summary(report: Report, top: int = 20) -> str:
    """A Markdown job summary: verdict, gate rules, and the most anomalous images."""
    s = report.summary
    if s.gate:
        head = "✅ gate passed" if s.gate_passed else "❌ gate failed"
    else:
        head = "no gate"
    lines = [
        f"### vae-anomaly: {head} (exit code {s.exit_code})",
        "",
        f"{s.flagged} of {s.scored} scored images flagged, {s.unreadable} unreadable. "
        f"Rule: {_md(s.rule)}. {_md(s.guarantee)}",
        "",
    ]
    if s.gate:
        lines += ["| rule | measured | limit | fails when | result |", "| --- | --- | --- | --- | --- |"]
        lines += [
            f"| {c.name} | {c.value:.4g} | {c.limit:g} | {c.fails_when} | {'pass' if c.passed else '**FAIL**'} |"
            for c in s.gate
        ]
        lines.append("")
    bad = [r for r in report.records if r.flagged or r.error]
    if bad:
        lines += ["| # | image | score | p-value | |", "| --- | --- | --- | --- | --- |"]
        for r in bad[:top]:
            if r.error is not None:
                lines.append(f"| | {_md(r.path)} | | | unreadable: {_md(r.error)} |")
            else:
                lines.append(f"| {r.rank} | {_md(r.path)} | {r.score:.4g} | {r.p_value:.4g} | anomaly |")
        if len(bad) > top:
            lines.append(f"\n{len(bad) - top} more in the JSON or JUnit report.")
        lines.append("")
    return "\n".join(lines) + "\n"
