"""Reading JSON reports back in (--baseline, shard reports): validated against the shipped JSON Schema.

Every document is checked against `schemas/score-report.schema.json` before
any field is used, so a damaged or edited file is refused with the path and
what is wrong, never half read.
"""

from __future__ import annotations

import json
import os
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BaselineError, DocumentError
from .report import SCHEMA_NAME, SCHEMA_VERSION

HOW = "write one with `vae-anomaly score ... --format json --output FILE`"
# A report of a million images is about 500 MB; beyond this, reading it takes minutes and gigabytes.
MAX_REPORT_BYTES = 1 << 30


@cache
def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the `--format json` report, shipped in the package."""
    text = resources.files("vae_anomaly").joinpath("schemas/score-report.schema.json").read_text(encoding="utf-8")
    return dict(json.loads(text))


def _refuse_constant(word: str) -> float:
    """NaN, Infinity and -Infinity, which Python's json reads but JSON does not allow."""
    raise ValueError(f"{word} where JSON allows only numbers")


def read_report(
    path: str | os.PathLike[str], what: str, error: type[DocumentError] = DocumentError, how: str = HOW
) -> dict[str, Any]:
    """A score report from disk, valid against the schema; `error` (naming `what` and the file) otherwise."""
    import jsonschema

    name = f"{what}{os.fsdecode(path)}"
    try:
        size = os.stat(path).st_size
        if size > MAX_REPORT_BYTES:
            raise error(
                f"{name}: {size / 2**20:,.0f} MiB, more than the {MAX_REPORT_BYTES / 2**20:,.0f} MiB a report is read "
                "up to; split the batch into more shards (`score --shard I/N`)"
            )
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{name}: no such file; {how}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{name}: cannot be read ({exc}); {how}") from None
    try:
        doc = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise error(f"{name}: not a JSON file ({exc}); {how}") from None
    except ValueError as exc:  # NaN or Infinity: not JSON, and a NaN score would pass every comparison
        raise error(f"{name}: {exc}; the file was edited, {how}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_NAME:
        raise error(f'{name}: not a vae-anomaly score report (no "schema": "{SCHEMA_NAME}"); {how}')
    version = doc.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise error(f"{name}: schema_version must be a whole number, got {version!r}; the file was edited, {how}")
    if version != SCHEMA_VERSION:
        raise error(
            f"{name}: report schema version {doc.get('schema_version')}, this vae-anomaly reads {SCHEMA_VERSION}; "
            "score the batch again with this version"
        )
    problem = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema()).iter_errors(doc))
    if problem is not None:
        where = "/".join(str(p) for p in problem.absolute_path) or "the document"
        raise error(
            f"{name}: not a valid score report at {where}: {problem.message[:300]}; the file was cut or edited, {how}"
        )
    return doc


def load_baseline(path: str | os.PathLike[str], fingerprint: str | None, score: str) -> np.ndarray:
    """The scores of a previous `--format json` report, checked to come from this model and score."""
    name = os.fsdecode(path)
    doc = read_report(path, "--baseline ", BaselineError)
    summary = doc["summary"]
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
    scores = np.array([r["score"] for r in doc["records"] if r["score"] is not None], dtype=np.float64)
    if len(scores) == 0:
        raise BaselineError(f"--baseline {name}: the report holds no scored images")
    return scores
