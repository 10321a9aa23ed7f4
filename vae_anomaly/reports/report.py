"""Per-image records, the run summary, and the machine-readable writers (JSON, JSONL, CSV).

The JSON document is a stable, versioned schema, described by the JSON
Schema file `schemas/score-report.schema.json` shipped in this package:

    {"schema": "vae-anomaly/score", "schema_version": 1,
     "summary": {...}, "warnings": [...],
     "records": [{"rank", "path", "score", "p_value", "flagged", "error",
                  "reasons", "atypical", "duplicate_of", "duplicate_kind", "duplicate_in", "region", "tile"}, ...]}

A flagged record's `reasons` say why, in words (checks.py): the model's
own finding and every image-property check at p <= the cut-off, at least
one. Every scored record's `atypical` holds its (up to) three most
atypical statistics, flagged or not, with value, normal range and p-value,
so that a near miss can be judged. `duplicate_of` names a training image (`duplicate_in` "training": a
leak) or an earlier image of the batch ("batch") that the image copies,
`duplicate_kind` "exact" or "near" (duplicates.py). `region` is the box
[x0, y0, x1, y1], in the file's own pixels, of the image's most unusual
region by the local statistic (local.py); `tile`, the tile it lies in
where a tile found it (tiles.py), else null.

Records come most anomalous first (by the decision's own statistic), then
the unreadable files. CI writers live in `ci.py`; reading reports back in,
validated against the schema, in `documents.py`.

A shard's report (`score --shard I/N`) adds optional fields for `merge`: a
top-level "shard" block and each record's "index" (and "model_scores"); see
shard.py. Other reports do not carry them.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..decision.batch_tests import BatchTest
from ..decision.calibration import decision_statistic
from ..decision.checks import Reason
from ..decision.gate import GateCheck

if TYPE_CHECKING:
    from ..decision.rule import Decision
    from ..images.duplicates import Duplicate

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
    guard_score: float | None = None  # the guard statistic's score, from which merge recomputes p
    guard_model_scores: tuple[float, ...] | None = None  # and under each cross-fitted model
    checks: dict[str, float] | None = None  # the property checks' values, from which merge recomputes p
    # The duplicate fingerprints (exact, near) as 16 hex digits each, from which merge finds the copies
    # across shards.
    fingerprints: tuple[str, str] | None = None
    # Why a flagged image was flagged (checks.explain), most atypical first; empty for the others.
    reasons: tuple[Reason, ...] = ()
    # Every scored image's most atypical statistics (up to checks.ATYPICAL), flagged or not, so that a
    # near miss can be judged; empty for unreadable files and for reports written without them.
    atypical: tuple[Reason, ...] = ()
    duplicate_of: str | None = None  # the training image or earlier image of the batch it copies
    duplicate_kind: str | None = None  # "exact" or "near"
    duplicate_in: str | None = None  # "training" (a leak) or "batch"
    # The most unusual region (local.py): [x0, y0, x1, y1] in the file's own pixels; None for model
    # files without the local statistic and for unreadable files.
    region: tuple[int, int, int, int] | None = None
    # The tile that region lies in (tiles.py), the same way; None where the whole image found it.
    tile: tuple[int, int, int, int] | None = None

    @property
    def leak(self) -> bool:
        return self.duplicate_in == "training"


OPTIONAL_RECORD_FIELDS = ("index", "model_scores", "guard_score", "guard_model_scores", "checks", "fingerprints")


def record_dict(r: ImageRecord) -> dict[str, Any]:
    """A record as JSON data; the shard-only fields appear only in shard reports."""
    d = asdict(r)
    for key in OPTIONAL_RECORD_FIELDS:
        if d[key] is None:
            del d[key]
    return d


def reasons_text(r: ImageRecord, limit: int | None = None) -> str:
    """A record's reasons (the first `limit`) and duplicate in one line, for tables, cells and CI messages."""
    parts = [reason.text for reason in r.reasons[:limit]]
    if limit is not None and len(r.reasons) > limit:
        parts[-1] += f" (and {len(r.reasons) - limit} more)"
    if r.duplicate_of is not None:
        parts.append(duplicate_text(r))
    return "; ".join(parts)


NEAR_MISS = 5.0  # an unflagged image with p within this factor of the level is a near miss


def near_miss(r: ImageRecord, level: float | None) -> bool:
    """Whether an unflagged record came near the level flags were decided at (within NEAR_MISS times it)."""
    return level is not None and not r.flagged and r.p_value is not None and r.p_value <= NEAR_MISS * level


def atypical_text(r: ImageRecord, limit: int | None = None) -> str:
    """A record's most atypical statistics with their p-values, in one line: what a near miss came near on."""
    return "; ".join(f"{a.text} (p {a.p_value:.2g})" for a in r.atypical[:limit])


def why_text(r: ImageRecord, level: float | None, limit: int | None = None) -> str:
    """What a table shows beside a record: a flagged one's reasons, a near miss's most atypical statistics."""
    if near_miss(r, level) and r.atypical:
        text = "near miss: " + atypical_text(r, limit)
        return text + ("; " + duplicate_text(r) if r.duplicate_of is not None else "")
    return reasons_text(r, limit)


def duplicate_text(r: ImageRecord) -> str:
    """The image a record copies, in words: "exact copy of a training image: train/x.png"."""
    where = "a training image" if r.leak else "an earlier image of the batch"
    return f"{r.duplicate_kind} copy of {where}: {r.duplicate_of}"


def duplicates_text(s: Summary) -> str:
    """A run's duplicate counts in words, for the verdict lines, the step summary and the HTML report."""
    return f"copies of training images (leaks): {s.leaks}, of earlier images of the batch: {s.duplicates}"


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
    # The level flags were decided at (--fpr or --fdr, raised to the smallest reachable p-value
    # unless --strict-fpr); None for a raw score threshold.
    effective_fpr: float | None = None
    duplicates: int = 0  # images that copy an earlier image of the batch
    leaks: int = 0  # images that copy a training image

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


def build_report(
    paths: list[str],
    scores: np.ndarray,
    errors: list[tuple[str, str]],
    decision: Decision,
    *,
    calibration: np.ndarray,
    score: str,
    samples: int,
    ignored: int,
    fingerprint: str | None,
    skip_unreadable: bool,
    warnings: list[str] | None = None,
    tests: dict[str, BatchTest] | None = None,
    models: int = 1,
    baseline: str | None = None,
    reasons: Sequence[Sequence[Reason]] | None = None,
    atypical: Sequence[Sequence[Reason]] | None = None,
    duplicates: Sequence[Duplicate | None] | None = None,
    regions: Sequence[Sequence[int] | None] | None = None,
    tiles: Sequence[Sequence[int] | None] | None = None,
) -> Report:
    """Records ranked by the decision's own statistic and the summary; the gate is judged after it
    (`verdict.judge`).

    `reasons[i]`, `atypical[i]`, `duplicates[i]`, `regions[i]` and `tiles[i]` belong to `paths[i]` (Detector.explain,
    Detector.duplicates, local.py, tiles.py)."""
    threshold, p, flags = decision.threshold, decision.p_values, decision.flags
    # Most anomalous first, by the decision's own statistic (a raw threshold ranks by score).
    if threshold.rule == "score":
        order = np.argsort(-np.asarray(scores), kind="stable")
    else:
        order = np.argsort(-decision_statistic(calibration, scores, threshold.tail, p), kind="stable")
    records = []
    for rank, i in enumerate(order):
        dup = duplicates[i] if duplicates is not None else None
        records.append(
            ImageRecord(
                rank + 1,
                paths[i],
                float(scores[i]),
                float(p[i]),
                bool(flags[i]),
                reasons=tuple(reasons[i]) if reasons is not None else (),
                atypical=tuple(atypical[i]) if atypical is not None else (),
                duplicate_of=None if dup is None else dup.of,
                duplicate_kind=None if dup is None else dup.kind,
                duplicate_in=None if dup is None else ("training" if dup.training else "batch"),
                region=_region(regions[i]) if regions is not None else None,
                tile=_region(tiles[i]) if tiles is not None else None,
            )
        )
    records += [ImageRecord(None, path, None, None, None, reason) for path, reason in errors]
    n_flagged = int(np.sum(flags))
    n_leaks = sum(1 for r in records if r.leak)
    n_duplicates = sum(1 for r in records if r.duplicate_in == "batch")
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
        guarantee=decision.guarantee,
        models=models,
        smallest_p_value=decision.floor,
        tests={k: t.to_dict() for k, t in (tests or {}).items()},
        baseline=baseline,
        effective_fpr=None if threshold.rule == "score" else threshold.alpha,
        duplicates=n_duplicates,
        leaks=n_leaks,
    )
    report = Report(records, summary, list(warnings or []))
    summary.exit_code = report.return_code
    return report


def _region(box: Sequence[int] | None) -> tuple[int, int, int, int] | None:
    """A box as four ints; None for none (or the -1 rows that stand for none in arrays)."""
    if box is None or int(box[0]) < 0:
        return None
    return (int(box[0]), int(box[1]), int(box[2]), int(box[3]))


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


# A cell starting with one of these is run as a formula by spreadsheets (OWASP, "CSV Injection").
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_text(text: str) -> str:
    """A text cell safe to open in a spreadsheet: one that would start a formula gets a leading '.

    Only the text columns (path, error) pass through here; numbers are written as numbers.
    """
    return "'" + text if text.startswith(FORMULA_START) else text


def to_csv(report: Report) -> str:
    """One row per record; text cells that a spreadsheet would run as a formula are neutralised (csv_text)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "rank",
            "path",
            "score",
            "p_value",
            "flagged",
            "error",
            "reasons",
            "duplicate_of",
            "duplicate_kind",
            "duplicate_in",
            "region",
            "tile",
            "atypical",
        ]
    )
    for r in report.records:
        w.writerow(
            [
                "" if r.rank is None else r.rank,
                csv_text(r.path),
                "" if r.score is None else repr(r.score),
                "" if r.p_value is None else repr(r.p_value),
                "" if r.flagged is None else str(r.flagged).lower(),
                csv_text(r.error or ""),
                csv_text("; ".join(reason.text for reason in r.reasons)),
                csv_text(r.duplicate_of or ""),
                r.duplicate_kind or "",
                r.duplicate_in or "",
                "" if r.region is None else " ".join(map(str, r.region)),
                "" if r.tile is None else " ".join(map(str, r.tile)),
                csv_text("; ".join(f"{a.text} (p {a.p_value:.3g})" for a in r.atypical)),
            ]
        )
    return buf.getvalue()


WRITERS = {"json": to_json, "jsonl": to_jsonl, "csv": to_csv}
