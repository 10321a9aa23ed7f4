"""Scoring one batch on many machines: the split (`score --shard I/N`); `merge.py` is the join.

A shard report is an ordinary score report plus what the join needs to
rebuild, exactly, the report that one unsharded run would have written:

- each record's position in the whole sorted listing (the unsharded run's
  order: ranking ties, the unreadable files and the cross-fitted shift test
  follow it), the guard statistic's score, and for K cross-fitted models
  both scores under each model;
- a `shard` block: I, N, the split rule, the listing's size, the scoring
  options, the calibration scores of the score and the guard with the fold
  of each (merge recomputes every p-value from them, and the shift test,
  the ranking and Benjamini-Hochberg's score bounds compare with them), the
  inputs unlike the training images (their counts add up) and the
  decision's own warnings.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..decision.calibration import Calibration
from ..decision.checks import PREFIX
from ..decision.rule import DecisionRule
from ..errors import ConfigError
from ..images.duplicates import NEAR_BITS
from ..images.listing import FileListing, display_path, find_images, require_images
from .report import Report

if TYPE_CHECKING:
    from ..model.inference import ScoreResult

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
    "checks": "--checks/--no-checks",
}


MAX_SHARDS = 10_000


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` -> (I, N), with 1 <= I <= N; ConfigError says what is wrong and what to type."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if m is None:
        raise ConfigError(f"expected I/N, e.g. 2/3 for the second of three shards, got {text!r}")
    index, count = int(m[1]), int(m[2])
    if count < 1:
        raise ConfigError(f"{text}: N, the number of shards, must be at least 1")
    if count > MAX_SHARDS:
        raise ConfigError(f"{text}: at most {MAX_SHARDS:,} shards (merge holds every shard's report at once)")
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
    result: ScoreResult,
    calibration: Calibration,
    decision_warnings: Sequence[str],
    checked: dict[str, np.ndarray] | None = None,
    near_bits: int = NEAR_BITS,
) -> Report:
    """`report` (of this shard's files) with what `merge_reports` needs added.

    Each record keeps its listing position and, where they exist, the guard
    statistic's score, each cross-fitted model's scores and the property
    checks' values; the block keeps the calibration scores of the score, the
    guard and the checks and the fold of each, so that `merge` recomputes
    every p-value from its scores.
    """
    where = shard.position_of()
    guard = result.guard

    def per_image(model_scores: np.ndarray | None) -> dict[str, tuple[float, ...]]:
        if model_scores is None:
            return {}
        return {p: tuple(float(v) for v in model_scores[:, j]) for j, p in enumerate(result.paths)}

    per_model, guard_per_model = (
        per_image(result.model_scores),
        per_image(None if guard is None else guard.model_scores),
    )
    guard_of = {} if guard is None else {p: float(v) for p, v in zip(result.paths, guard.scores, strict=True)}
    checks_of = {p: {name: float(v[j]) for name, v in (checked or {}).items()} for j, p in enumerate(result.paths)}
    fp = result.facts.fingerprints if result.facts is not None else None
    prints: dict[str, tuple[str, str]] = {}
    if fp is not None:
        pairs = zip(result.paths, fp.exact.tolist(), fp.near.tolist(), strict=True)
        prints = {p: (f"{e:016x}", f"{n:016x}") for p, e, n in pairs}
    records = [
        replace(
            r,
            index=where[r.path],
            model_scores=per_model.get(r.path),
            guard_score=guard_of.get(r.path),
            guard_model_scores=guard_per_model.get(r.path),
            checks=checks_of.get(r.path) if checked else None,
            fingerprints=prints.get(r.path),
        )
        for r in report.records
    ]
    block = {
        "index": shard.index,
        "count": shard.count,
        "split": SPLIT,
        "listing": shard.total,
        "options": options,
        "calibration": [float(c) for c in calibration.of(result.score)],
        "calibration_folds": [int(k) for k in calibration.folds],
        "guard_calibration": None if guard is None else [float(c) for c in calibration.of(guard.score)],
        "near_bits": near_bits,
        "checks_calibration": {
            k.removeprefix(PREFIX): [float(c) for c in v] for k, v in calibration.scores.items() if k.startswith(PREFIX)
        },
        "checks_sides": None if calibration.sides is None else dict(calibration.sides),
        "features": calibration.features,
        "unlike": [{"kind": k, "count": c, "example": e} for k, (c, e) in result.unlike.items()],
        "decision_warnings": list(decision_warnings),
    }
    return replace(report, records=records, shard=block)
