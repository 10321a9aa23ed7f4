"""Joining the shard reports of `score --shard I/N` into the report one unsharded run would write (`merge`).

Nothing that depends on the whole batch is combined from shard verdicts:
every p-value is recomputed from the records' scores and the calibration
the shards carry (a record that disagrees is refused as edited), and flags
under `--fdr` (BH over all p-values), ranks, the batch tests and the gate
are computed again over the union, by the functions `score` uses. What
merge cannot see: a score itself forged, with its p-value forged to match;
only scoring the images again can.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..decision.calibration import Calibration
from ..decision.checks import PREFIX, Reason
from ..decision.gate import GateRule
from ..decision.rule import DecisionRule
from ..errors import CalibrationError, ConfigError, MergeError
from ..images.decoding import Unlike, merge_unlike, unlike_warnings
from ..images.duplicates import NEAR_BITS, Duplicate, Fingerprints, find_duplicates
from .documents import read_report
from .report import Report
from .shard import MAX_SHARDS, OPTION_FLAGS, shard_positions
from .verdict import ScoredBatch, Verdict, verdict


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
    calibration_folds: np.ndarray | None  # None: written by a version that did not keep them
    guard_calibration: np.ndarray | None
    checks_calibration: dict[str, np.ndarray]  # property check -> calibration values ({} without checks)
    checks_sides: dict[str, str] | None  # the side(s) the decision tests each check on (None: older reports)
    features: str  # what the model's VAE models (features.py; reports before it: pixels)
    near_bits: int  # the model's near-duplicate bound
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
        calibration_folds=None if "calibration_folds" not in block else np.array(block["calibration_folds"], np.int64),
        guard_calibration=None
        if block.get("guard_calibration") is None
        else np.array([_number(v) for v in block["guard_calibration"]], dtype=np.float64),
        near_bits=int(block.get("near_bits", NEAR_BITS)),
        checks_calibration={
            k: np.array([_number(v) for v in values], dtype=np.float64)
            for k, values in block.get("checks_calibration", {}).items()
        },
        checks_sides=None
        if block.get("checks_sides") is None
        else {str(k): str(v) for k, v in block["checks_sides"].items()},
        features=str(block.get("features", "pixels")),
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
    if first.count > MAX_SHARDS:  # a count no `score --shard` writes: an edit, and a list of that length
        raise MergeError(f"{first.path} claims {first.count:,} shards, more than the {MAX_SHARDS:,} score writes")
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
        if not all(
            _same(a, b)
            for a, b in (
                (sh.calibration, first.calibration),
                (sh.calibration_folds, first.calibration_folds),
                (sh.guard_calibration, first.guard_calibration),
            )
        ):
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


def _check_rule(rule: DecisionRule, first: ShardReport) -> None:
    """The shards must have been scored with the rule merge applies: a report never brings its own."""
    theirs = DecisionRule.from_options(first.options).options()
    for key, value in rule.options().items():
        if theirs.get(key) != value:
            flag = OPTION_FLAGS.get(key, "--strict-fpr")
            raise MergeError(
                f"{first.path} was scored with {flag} {theirs.get(key)}, but merge applies {flag} {value}: merge "
                "decides with its own options, never a shard's; pass merge the options the shards were scored "
                "with (or score them again with these)"
            )


def _check_scores(readable: Sequence[dict[str, Any]], scores: np.ndarray, model_scores: np.ndarray | None) -> None:
    """A record's score is the mean of its models' scores: one without the other was edited."""
    if model_scores is None:
        return
    mean = model_scores.mean(axis=0)
    bad = np.nonzero(~np.isclose(scores, mean, rtol=1e-9, atol=1e-12))[0]
    if len(bad):
        r = readable[int(bad[0])]
        raise MergeError(
            f"{r['path']}: its score {r['score']} is not the mean of its models' scores {r['model_scores']}; "
            "the report was edited: score this shard again"
        )


def merge_reports(
    shards: Sequence[ShardReport],
    *,
    rule: DecisionRule | None = None,
    gate: list[GateRule],
    skip_unreadable: bool = False,
    baseline: str | os.PathLike[str] | None = None,
    model_fingerprint: str | None = None,
    model_calibration: Calibration | None = None,
) -> Report:
    """The report one unsharded `score` run over the whole listing would have written, gate included.

    Raises MergeError for a missing, duplicated or foreign shard, one scored
    with other decision options than `rule`, or one whose scores or p-values
    do not follow from its models' scores and calibration (an edit),
    and BaselineError for a `baseline` of another model or score.
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
    readable, unreadable, origin = _records(ordered)
    models = int(s0["models"])
    scores, p, model_scores = _scores(readable, models)
    _check_scores(readable, scores, model_scores)
    calibration = first.calibration
    if rule is None:  # the Python API without a rule: the shards' (the CLI always passes merge's own)
        rule = DecisionRule.from_options(opts).resolved(first.features)
    else:
        rule = rule.resolved(first.features)
        _check_rule(rule, first)
    if model_calibration is not None and not np.array_equal(model_calibration.of(rule.score), calibration):
        raise MergeError(
            f"{first.path}: its calibration scores are not those of the --model file; the reports were edited"
        )
    carried = _carried_calibration(rule, first, models)
    p = _recomputed_p(rule, carried, readable, scores, model_scores, p, origin)
    # The rule is applied again over the union: Benjamini-Hochberg needs every p-value of the batch.
    # The shards' warnings, with what their rule could not reach said again for merge's own rule.
    n_cal = len(carried.of(rule.score))
    theirs = DecisionRule.from_options(opts).unreachable(n_cal, models)
    ours = rule.unreachable(n_cal, models)
    warnings = [w for w in first.decision_warnings if w != theirs] + ([ours] if ours else [])
    decision = rule.decision(scores, p, carried, warnings)
    # Each shard kept the findings of every image that could be flagged; the verdict picks the reasons of
    # the images merge flags, at its own cut-off.
    batch = ScoredBatch(
        [r["path"] for r in readable],
        scores,
        [(r["path"], r["error"]) for r in unreadable],
        calibration,
        score=s0["score"],
        samples=int(s0["samples"]),
        ignored=int(s0["ignored"]),
        fingerprint=s0["model_fingerprint"],
        models=models,
        model_scores=model_scores,
        findings=[[_reason(d) for d in r.get("reasons", [])] for r in readable],
        atypical=[[_reason(d) for d in r.get("atypical", [])] for r in readable],
        duplicates=_duplicates(readable, first.near_bits),
        regions=[r.get("region") for r in readable],
        tiles=[r.get("tile") for r in readable],
        warnings=[*unlike_warnings(_merge_unlike(ordered)), *warnings],
    )
    asked = Verdict(tuple(gate), skip_unreadable, None if baseline is None else Path(baseline))
    return verdict(batch, decision, rule, asked)


def _records(ordered: Sequence[ShardReport]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[int, str]]:
    """The shards' readable and unreadable records in listing order, and the shard report that holds each
    position; each shard must hold exactly its own positions, so that together they are the listing."""
    first = ordered[0]
    n, total = first.count, first.listing
    readable: list[dict[str, Any]] = []
    unreadable: list[dict[str, Any]] = []
    origin: dict[int, str] = {}  # listing position -> the shard report that holds it
    for sh in ordered:
        if sorted(r["index"] for r in sh.records) != list(shard_positions(total, sh.index, n)):
            raise MergeError(
                f"{sh.path}: its {len(sh.records)} records are not those of shard {sh.index}/{n} of a listing of "
                f"{total} files; the report was cut or edited: score this shard again"
            )
        for r in sh.records:
            (readable if r["error"] is None else unreadable).append(r)
            origin[r["index"]] = sh.path
    readable.sort(key=lambda r: r["index"])
    unreadable.sort(key=lambda r: r["index"])
    return readable, unreadable, origin


def _scores(readable: list[dict[str, Any]], models: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The records' scores, p-values and, with K > 1 cross-fitted models, each model's scores (K, N)."""
    scores = np.array([_number(r["score"]) for r in readable], dtype=np.float64)
    p = np.array([_number(r["p_value"]) for r in readable], dtype=np.float64)
    if models <= 1:
        return scores, p, None
    try:
        model_scores = np.array([[_number(v) for v in r["model_scores"]] for r in readable], dtype=np.float64)
        return scores, p, model_scores.reshape(len(readable), models).T
    except (KeyError, TypeError, ValueError):
        raise MergeError(
            f"the shard reports lack the scores of each of the {models} cross-fitted models (written by an "
            "older vae-anomaly, or edited); score the shards again"
        ) from None


def _reason(d: dict[str, Any]) -> Reason:
    value, normal = d.get("value"), d.get("normal")
    span = None if normal is None else (float(normal[0]), float(normal[1]))
    return Reason(str(d["check"]), None if value is None else float(value), float(d["p_value"]), str(d["text"]), span)


def _duplicates(readable: list[dict[str, Any]], near_bits: int) -> list[Duplicate | None]:
    """Each record's copy as one run finds it: the shards' leaks (each shard compared its images with
    every training image), and copies within the batch found again over the union, in listing order,
    from the records' fingerprints."""
    if any(r.get("fingerprints") is None for r in readable):  # written before fingerprints: as the shards say
        return [_leak(r) if r.get("duplicate_of") is not None else None for r in readable]
    prints = [r["fingerprints"] for r in readable]
    exact = np.array([int(p[0], 16) for p in prints], dtype=np.uint64)
    near = np.array([int(p[1], 16) for p in prints], dtype=np.uint64)
    within = find_duplicates(
        Fingerprints(exact, near), [r["path"] for r in readable], Fingerprints.empty(), [], near_bits
    )
    return [_leak(r) if r.get("duplicate_in") == "training" else d for r, d in zip(readable, within, strict=True)]


def _leak(r: dict[str, Any]) -> Duplicate:
    return Duplicate(str(r["duplicate_of"]), str(r["duplicate_kind"]), r.get("duplicate_in") == "training", 0)


def _carried_calibration(rule: DecisionRule, first: ShardReport, models: int) -> Calibration:
    """The calibration the shards carry (score, guard, folds), as the rule needs it."""
    if first.calibration_folds is None or (rule.guard is not None and first.guard_calibration is None):
        raise MergeError(f"{first.path}: the report lacks its calibration folds or guard scores; score it again")
    cal = {rule.score: first.calibration}
    if rule.guard is not None and first.guard_calibration is not None:
        cal[rule.guard] = first.guard_calibration
    if rule.checks:
        cal.update({PREFIX + name: values for name, values in first.checks_calibration.items()})
    return Calibration(cal, first.calibration_folds, models, first.checks_sides, first.features)


def _recomputed_p(
    rule: DecisionRule,
    calibration: Calibration,
    readable: list[dict[str, Any]],
    scores: np.ndarray,
    model_scores: np.ndarray | None,
    p: np.ndarray,
    origin: dict[int, str],
) -> np.ndarray:
    """Every p-value again, from the records' scores and the calibration: a shard's own p-values and flags
    are never trusted, and a record whose p-value disagrees is refused as edited."""
    models = calibration.models
    guard = guard_models = None
    try:
        if rule.guard is not None:
            guard = np.array([_number(r["guard_score"]) for r in readable], dtype=np.float64)
            if models > 1:
                guard_models = np.array([r["guard_model_scores"] for r in readable], dtype=np.float64).T
        names = [k.removeprefix(PREFIX) for k in rule.statistics_in(calibration)[len(rule.statistics) :]]
        checked = {n: np.array([_number(r["checks"][n]) for r in readable], dtype=np.float64) for n in names}
        expected = rule.p_values(calibration, scores, model_scores, guard, guard_models, checked)
    except (KeyError, TypeError, ValueError, CalibrationError) as exc:
        raise MergeError(f"the shard reports lack scores the p-values need ({exc}); score the shards again") from None
    wrong = np.nonzero(~np.isclose(expected, p, rtol=1e-9, atol=1e-12))[0]
    if len(wrong):
        r = readable[int(wrong[0])]
        raise MergeError(
            f"{origin[r['index']]}: {r['path']} has p-value {r['p_value']}, but its score gives "
            f"{expected[wrong[0]]:.6g} ({len(wrong)} record(s) disagree); the report was edited: score this shard again"
        )
    return expected


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.array_equal(a, b, equal_nan=True))
