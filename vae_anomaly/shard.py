"""Scoring one batch on many machines: the split (`score --shard I/N`) and the join (`merge`).

A shard report is an ordinary score report plus what the join needs to
rebuild, exactly, the report that one unsharded run would have written:

- each record's position in the whole sorted listing (the unsharded run's
  order: ranking ties, the unreadable files and the cross-fitted shift test
  follow it) and, for K cross-fitted models, its score under each model;
- a `shard` block: I, N, the split rule, the listing's size, the scoring
  options, the calibration scores of the score (the shift test and the
  ranking compare with them, and Benjamini-Hochberg's score bounds are read
  off them), the inputs unlike the training images (their counts add up)
  and the decision's own warnings.

Nothing that depends on the whole batch is combined from shard verdicts:
flags under `--fdr` (BH over all p-values), ranks, the batch tests and the
gate are computed again over the union, by the functions `score` uses.
Per-image scores and p-values do not depend on the batch and are kept.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .batch_tests import run_batch_tests
from .decision import DecisionRule
from .decoding import Unlike, merge_unlike, unlike_warnings
from .documents import load_baseline, read_report
from .errors import ConfigError, MergeError
from .gate import GateRule
from .listing import FileListing, display_path, find_images, require_images
from .report import Report, build_report

SPLIT = "round-robin"  # the only split rule; recorded so that a future one cannot be merged by mistake

# Scoring options every shard must share, with the flag that sets each (for messages).
OPTION_FLAGS: dict[str, str] = {
    "score": "--score",
    "samples": "--samples",
    "tail": "--tail",
    "threshold": "--threshold",
    "fpr": "--fpr",
    "fdr": "--fdr",
    "guard": "--guard",
}


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` -> (I, N), with 1 <= I <= N; ConfigError says what is wrong and what to type."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if m is None:
        raise ConfigError(f"expected I/N, e.g. 2/3 for the second of three shards, got {text!r}")
    index, count = int(m[1]), int(m[2])
    if count < 1:
        raise ConfigError(f"{text}: N, the number of shards, must be at least 1")
    if not 1 <= index <= count:
        raise ConfigError(f"{text}: I must be between 1 and N = {count} (shards are numbered from 1)")
    return index, count


def shard_positions(total: int, index: int, count: int) -> range:
    """The positions (0-based) in the sorted listing of `total` files that shard `index` of `count` scores.

    Round robin: position p goes to shard p mod N + 1, so every file is in
    exactly one shard and the N shards together are the whole listing. Why
    not a hash of each path: the listing is already the same on every
    machine (folders are walked in sorted order); round robin gives shards
    that differ by at most one file, and spreads every subfolder (often one
    kind or size of image) over all runners, where hashing gives uneven,
    possibly empty shards on small batches. A hash's one advantage, a file
    keeping its shard when others are added, buys nothing when each CI run
    scores the whole batch again.
    """
    return range(index - 1, total, count)


@dataclass(frozen=True)
class Shard:
    """One shard of a listing: its files, and where each sits in the whole listing."""

    index: int  # I, from 1
    count: int  # N
    listing: FileListing  # this shard's files; `ignored` is the whole listing's count
    positions: list[int]  # each file's position in the whole listing
    total: int  # image files in the whole listing, all shards

    def position_of(self) -> dict[str, int]:
        """Listing position by the path as records show it."""
        return {display_path(f): p for f, p in zip(self.listing.files, self.positions, strict=True)}


def select_shard(inputs: Sequence[str | os.PathLike[str]], index: int, count: int) -> Shard:
    """This shard's part of the listing of `inputs`.

    The whole listing must hold images, as for an unsharded run; one shard
    may be empty (more shards than files), and its report still counts.
    """
    listing = find_images(inputs)
    files = require_images(listing)
    positions = list(shard_positions(len(files), index, count))
    return Shard(index, count, FileListing([files[p] for p in positions], listing.ignored), positions, len(files))


def scoring_options(rule: DecisionRule, samples: int) -> dict[str, Any]:
    """The options that shape scores, p-values and flags; shards must agree on all of them."""
    return {**rule.options(), "samples": samples}


def shard_report(
    report: Report,
    shard: Shard,
    *,
    options: dict[str, Any],
    calibration: np.ndarray,
    paths: Sequence[str],
    model_scores: np.ndarray | None,
    unlike: Unlike,
    decision_warnings: Sequence[str],
) -> Report:
    """`report` (of this shard's files) with what `merge_reports` needs added.

    `paths` are the scored images in order and `model_scores` their (K, N)
    scores under K cross-fitted models (None for one model).
    """
    where = shard.position_of()
    per_model: dict[str, tuple[float, ...]] = {}
    if model_scores is not None:
        per_model = {p: tuple(float(v) for v in model_scores[:, j]) for j, p in enumerate(paths)}
    records = [replace(r, index=where[r.path], model_scores=per_model.get(r.path)) for r in report.records]
    block = {
        "index": shard.index,
        "count": shard.count,
        "split": SPLIT,
        "listing": shard.total,
        "options": options,
        "calibration": [float(c) for c in calibration],
        "unlike": [{"kind": k, "count": c, "example": e} for k, (c, e) in unlike.items()],
        "decision_warnings": list(decision_warnings),
    }
    return replace(report, records=records, shard=block)


# ----------------------------------------------------------------- merging
@dataclass
class ShardReport:
    """One shard's JSON report, read and checked for the fields merging uses."""

    path: str
    index: int
    count: int
    split: str
    listing: int
    options: dict[str, Any]
    calibration: np.ndarray
    unlike: list[tuple[str, int, str]]
    decision_warnings: list[str]
    summary: dict[str, Any]
    records: list[dict[str, Any]]


def _number(value: Any) -> float:
    """A JSON number; null (NaN or infinity written as null) becomes NaN."""
    return math.nan if value is None else float(value)


def load_shard_report(path: str | os.PathLike[str]) -> ShardReport:
    """Read one shard report, valid against the schema; MergeError names the file and says how to get a good one."""
    how = "shard reports are written by `vae-anomaly score ... --shard I/N --format json --output FILE`"
    doc = read_report(path, "", MergeError, how)
    name = os.fsdecode(path)
    block = doc.get("shard")
    if block is None:
        raise MergeError(
            f'{name}: the report of a whole run, not of one shard (no "shard" block), so there is nothing to '
            "merge it with; score each part with --shard I/N"
        )
    summary, records = doc["summary"], doc["records"]
    if any("index" not in r for r in records) or not 1 <= block["index"] <= block["count"]:
        raise MergeError(
            f"{name}: the shard report is incomplete or damaged (records without an index); score it again"
        )
    try:
        DecisionRule.from_options(block["options"])
    except ConfigError as exc:
        raise MergeError(
            f"{name}: the shard's scoring options cannot be used ({exc}); score this shard again"
        ) from None
    return ShardReport(
        path=name,
        index=block["index"],
        count=block["count"],
        split=block["split"],
        listing=block["listing"],
        options=block["options"],
        calibration=np.array([_number(v) for v in block["calibration"]], dtype=np.float64),
        unlike=[(u["kind"], u["count"], u["example"]) for u in block["unlike"]],
        decision_warnings=list(block["decision_warnings"]),
        summary=summary,
        records=records,
    )


def _option_text(key: str, value: Any) -> str:
    return f"{OPTION_FLAGS[key]} {'not given' if value is None else value}"


def _check_compatible(shards: Sequence[ShardReport]) -> list[ShardReport]:
    """One run's N shards, each once, same model, options and listing; returned in shard order."""
    first = shards[0]
    again = "score every shard with the same model file, options and inputs"
    for sh in shards[1:]:
        if (sh.count, sh.split) != (first.count, first.split):
            raise MergeError(
                f"{sh.path} is shard {sh.index}/{sh.count}, but {first.path} is shard {first.index}/{first.count}: "
                "merge the reports of one sharded run, all split the same way"
            )
        theirs, ours = sh.summary["model_fingerprint"], first.summary["model_fingerprint"]
        if theirs != ours:
            raise MergeError(
                f"{sh.path} was scored by model {theirs}, but {first.path} by model {ours}: scores of different "
                f"models cannot be merged; {again}"
            )
        for key in OPTION_FLAGS:
            if sh.options.get(key) != first.options.get(key):
                raise MergeError(
                    f"{sh.path} was scored with {_option_text(key, sh.options.get(key))}, but {first.path} with "
                    f"{_option_text(key, first.options.get(key))}; {again}"
                )
        if (sh.listing, sh.summary["ignored"]) != (first.listing, first.summary["ignored"]):
            raise MergeError(
                f"{sh.path} listed {sh.listing} image files ({sh.summary['ignored']} ignored), but {first.path} "
                f"{first.listing} ({first.summary['ignored']} ignored): the runners saw different inputs; {again}, "
                "on the same checkout"
            )
        if not np.array_equal(sh.calibration, first.calibration, equal_nan=True):
            raise MergeError(f"{sh.path}: its calibration scores differ from {first.path}'s under one model; {again}")
    by_index: dict[int, ShardReport] = {}
    for sh in shards:
        if sh.index in by_index:
            raise MergeError(
                f"shard {sh.index}/{sh.count} given twice: {by_index[sh.index].path} and {sh.path}; pass each "
                "shard's report once"
            )
        by_index[sh.index] = sh
    n = first.count
    missing = [i for i in range(1, n + 1) if i not in by_index]
    if missing:
        got = ", ".join(f"{i} ({by_index[i].path})" for i in sorted(by_index))
        raise MergeError(
            f"shard{'s' if len(missing) > 1 else ''} {', '.join(f'{i}/{n}' for i in missing)} missing (got {got}): "
            f"pass all {n} reports of the run"
        )
    return [by_index[i] for i in range(1, n + 1)]


def _merge_unlike(shards: Sequence[ShardReport]) -> Unlike:
    """Counts add up; the example is the kind's first image in the whole listing, as one run reports it."""
    where = {r["path"]: r["index"] for sh in shards for r in sh.records}
    parts = [{kind: (count, example) for kind, count, example in sh.unlike} for sh in shards]
    listing = shards[0].listing if shards else 0
    return merge_unlike(parts, position=lambda path: where.get(path, listing))


def merge_reports(
    shards: Sequence[ShardReport],
    *,
    gate: list[GateRule],
    skip_unreadable: bool = False,
    baseline: str | os.PathLike[str] | None = None,
    model_fingerprint: str | None = None,
) -> Report:
    """The report one unsharded `score` run over the whole listing would have written, gate included.

    Raises MergeError for a missing, duplicated or foreign shard, and
    BaselineError for a `baseline` of another model or score.
    """
    if not shards:
        raise MergeError("no shard reports given")
    ordered = _check_compatible(shards)
    first = ordered[0]
    s0, opts = first.summary, first.options
    if model_fingerprint is not None and s0["model_fingerprint"] != model_fingerprint:
        raise MergeError(
            f"the shard reports were scored by model {s0['model_fingerprint']}, but --model is {model_fingerprint}; "
            "score the shards with this model file, or pass the one they used"
        )
    n, total = first.count, first.listing
    readable: list[dict[str, Any]] = []
    unreadable: list[dict[str, Any]] = []
    for sh in ordered:
        # Each shard holds exactly its own positions, so together they are the listing, each file once.
        if sorted(r["index"] for r in sh.records) != list(shard_positions(total, sh.index, n)):
            raise MergeError(
                f"{sh.path}: its {len(sh.records)} records are not those of shard {sh.index}/{n} of a listing of "
                f"{total} files; the report was cut or edited: score this shard again"
            )
        for r in sh.records:
            (readable if r["error"] is None else unreadable).append(r)
    readable.sort(key=lambda r: r["index"])
    unreadable.sort(key=lambda r: r["index"])
    scores = np.array([_number(r["score"]) for r in readable], dtype=np.float64)
    p = np.array([_number(r["p_value"]) for r in readable], dtype=np.float64)
    models = int(s0["models"])
    model_scores = None
    if models > 1:
        try:
            model_scores = np.array([[_number(v) for v in r["model_scores"]] for r in readable], dtype=np.float64)
            model_scores = model_scores.reshape(len(readable), models).T
        except (KeyError, TypeError, ValueError):
            raise MergeError(
                f"the shard reports lack the scores of each of the {models} cross-fitted models (written by an "
                "older vae-anomaly, or edited); score the shards again"
            ) from None
    calibration = first.calibration
    # The rule is applied again over the union: Benjamini-Hochberg needs every p-value of the batch.
    rule = DecisionRule.from_options(opts)
    decision = rule.decision(scores, p, calibration, models, first.decision_warnings)
    baseline_scores = None
    if baseline is not None:
        baseline_scores = load_baseline(baseline, s0["model_fingerprint"], s0["score"])
    tests = run_batch_tests(
        scores,
        p,
        calibration,
        fpr=rule.applied_fpr(len(calibration)),
        tail=rule.tail,
        model_scores=model_scores,
        baseline=baseline_scores,
    )
    return build_report(
        [r["path"] for r in readable],
        scores,
        [(r["path"], r["error"]) for r in unreadable],
        decision,
        calibration=calibration,
        score=s0["score"],
        samples=int(s0["samples"]),
        ignored=int(s0["ignored"]),
        fingerprint=s0["model_fingerprint"],
        gate=gate,
        skip_unreadable=skip_unreadable,
        warnings=[*unlike_warnings(_merge_unlike(ordered)), *first.decision_warnings],
        tests=tests,
        models=models,
        baseline=None if baseline is None else os.fsdecode(baseline),
    )
