"""Calibrated property checks and the reasons a record gives: "darker than 99.6% of normal images".

Each property of `properties.py` is calibrated like the model's score: its
values on the calibration images (normal, never trained on) are kept in the
model file. The decision takes them into its one test, each on its own side
(`Property.decided`, stored in the model file as `sides`), with the
score and the guard (`DecisionRule.checks`, `calibration._typicality`), so
the flagged share of normal images stays at the rule's level whatever the
number of checks. The file format is categorical: its value is the share of
calibration images in that format.

A reason states where an image lies on one check: the one-sided conformal
p-value on its side,

    p_low  = (1 + #{i : v_i <= v}) / (n + 1),   p_high = (1 + #{i : v_i >= v}) / (n + 1),

the smaller of the two for two-sided properties, the property's own side
for one-sided ones (`Property.tail`). A flagged record's reasons are every
check at p <= the decision's cut-off, most atypical first; the model's own
("unlike the normal images to the model: score too high") is one of them,
and when no check reaches the cut-off the most atypical one is named, so a
flagged record always has one.
Arrays (the Python API) have no file: their header checks (width, height,
aspect, format) get the calibration median, a neutral value.
No torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..images.duplicates import NEAR_BITS, calibrate_bound
from ..images.properties import BY_NAME, HEADER, Property
from .combination import Evidence

if TYPE_CHECKING:
    from ..images.facts import ImageFacts

PREFIX = "property:"  # calibration entries of the properties in the model file: "property:brightness"
MODEL_CHECK = "model"


def key(name: str) -> str:
    return PREFIX + name


def format_shares(formats: Sequence[str]) -> dict[str, float]:
    """Each file format's share of the calibration images."""
    if not formats:
        return {}
    names, counts = np.unique(np.asarray(formats, dtype=object).astype(str), return_counts=True)
    return {str(f): float(c) / len(formats) for f, c in zip(names, counts, strict=True)}


def values(
    properties: Mapping[str, np.ndarray], formats: Sequence[str], shares: Mapping[str, float]
) -> dict[str, np.ndarray]:
    """Every checked property of each image: the measured ones, and its format's share of the normal images."""
    out = {name: np.asarray(v, dtype=np.float64) for name, v in properties.items()}
    out["format"] = np.array([shares.get(f, 0.0) for f in formats], dtype=np.float64)
    return out


def calibrate(
    facts: ImageFacts, order: np.ndarray, paths: Sequence[str], warn: Callable[[str], None]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """What `fit` keeps for the checks: each property's values on the calibration images (positions
    `order`, as the scores are kept), and the metadata: the side(s) the decision tests each on, the
    format shares, the near-duplicate bound
    calibrated on every training image (`duplicates.calibrate_bound`, warned about when lowered) and
    the training files' names. A model fitted on an array checks pixels only: no file header."""
    formats = [facts.formats[i] for i in order]
    shares = format_shares(formats)
    calibrated = values({k: v[order] for k, v in facts.properties.items()}, formats, shares)
    if all(f == "" for f in facts.formats):
        calibrated = {k: v for k, v in calibrated.items() if k not in HEADER}
    bound = calibrate_bound(facts.fingerprints)
    if bound < NEAR_BITS:
        within = (
            f"perceptual hash within {bound + 1} bits, so copies are recognised only within {bound} bits"
            if bound >= 0
            else "perceptual hash identical to theirs, so only exact copies will be recognised"
        )
        warn(f"near duplicates: more than 1% of these training images have a distinct look-alike with a {within}")
    sides = {name: BY_NAME[name].decided for name in calibrated if BY_NAME[name].decided is not None}
    meta = {"formats": shares, "near_bits": bound, "training_files": list(paths), "sides": sides}
    return {key(name): v for name, v in calibrated.items()}, meta


def checked(facts: ImageFacts, meta: Mapping[str, Any], calibration: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The checked values of scored images. An array has no file: its header checks get the
    calibration median, a neutral value, so they never flag it."""
    shares = meta.get("formats", {})
    out = values(facts.properties, facts.formats, shares)
    arrays = np.array([f == "" for f in facts.formats], dtype=bool)
    if arrays.any() and "" not in shares:
        for name in HEADER:
            cal = calibration.get(key(name))
            if cal is not None and len(cal):
                out[name] = np.where(arrays, float(np.median(cal)), out[name])
    return out


@dataclass(frozen=True)
class Reason:
    """One check that found an image atypical: the check, its value, its p-value, and the words."""

    check: str
    value: float | None
    p_value: float
    text: str
    normal: tuple[float, float] | None = None  # the 5th-95th percentile of the normal images' values


def _number(prop: Property, v: float) -> str:
    return f"{v:,.{prop.digits}f}{prop.unit}"


@dataclass(frozen=True)
class NormalRange:
    """A property's calibration values, sorted, and their 5th-95th percentile range: "normal" in words."""

    values: np.ndarray
    lo: float
    hi: float

    @classmethod
    def of(cls, calibration: np.ndarray) -> NormalRange:
        values = np.sort(np.asarray(calibration, dtype=np.float64))
        lo, hi = np.percentile(values, [5, 95]) if len(values) else (np.nan, np.nan)
        return cls(values, float(lo), float(hi))

    def shares(self, v: float) -> tuple[float, float]:
        """The share of normal values above v and below v."""
        n = max(len(self.values), 1)
        above = len(self.values) - np.searchsorted(self.values, v, side="right")
        return float(above) / n, float(np.searchsorted(self.values, v, side="left")) / n


def describe(
    prop: Property, normal: NormalRange, v: float, fmt: str = "", shares: Mapping[str, float] | None = None
) -> str:
    """A check's finding in words: which side, beyond what share of normal images, against what range."""
    if prop.name == "format":
        seen = ", ".join(f"{f or 'arrays'} {s * 100:.3g}%" for f, s in sorted((shares or {}).items()))
        return f"a {fmt or 'non-file'} image, a format {v * 100:.3g}% of normal images have (normal: {seen})"
    higher, lower = normal.shares(v)  # normal images above v (v is lower than them), below v
    low_side = prop.tail == "lower" or (prop.tail == "two-sided" and higher >= lower)
    words, share = (prop.low, higher) if low_side else (prop.high, lower)
    return (
        f"{words} than {share * 100:.1f}% of normal images: {prop.what} {_number(prop, v)} "
        f"against {_number(prop, normal.lo)}-{_number(prop, normal.hi)}"
    )


ATYPICAL = 3  # the most atypical statistics every record carries, flagged or not


def statistic_p_values(calibration: np.ndarray, values: np.ndarray, tail: str) -> np.ndarray:
    """One statistic's p-value for each image, on its side(s), with the fitted tail beyond the normal
    images (`combination`, (1) and (2)): the evidence the decision combined, as a p-value."""
    evidence = Evidence.of(np.asarray(calibration, dtype=np.float64)[None], [tail])
    p: np.ndarray = np.exp(-evidence.per_statistic(np.asarray(values, dtype=np.float64)[None])[0])
    return p


def explain(
    which: Sequence[int],
    model: Mapping[str, tuple[np.ndarray, np.ndarray, str]],
    calibration: Mapping[str, np.ndarray],
    checked: Mapping[str, np.ndarray],
    formats: Sequence[str],
    shares: Mapping[str, float],
    sides: Mapping[str, str] | None = None,
    level: float | None = None,
) -> list[list[Reason]]:
    """The most atypical findings of the images `which`, most atypical first: the ATYPICAL first and
    every other at p <= `level` (`kept` picks a flagged image's reasons from them).

    `model` maps the model's statistics (the score, the guard) to (their values, their calibration
    values, their tail); they make one finding, "unlike the normal images to the model", at the
    smaller of their p-values. Each property is taken on the side(s) the decision tests it
    (`sides`), else its own (`Property.tail`). `checked` are the property values (`values`).
    """
    idx = np.asarray(which, dtype=np.int64)
    if len(idx) == 0:
        return []
    rows: list[tuple[str, np.ndarray]] = []  # (check, p of the images `which`)
    if model:
        own = {name: statistic_p_values(cal, v[idx], tail) for name, (v, cal, tail) in model.items()}
        first = next(iter(model))
        rows.append((MODEL_CHECK, np.min(list(own.values()), axis=0)))
        closest = np.argmin(list(own.values()), axis=0)
    names = [n for n in checked if n in BY_NAME and key(n) in calibration]
    for name in names:
        side = (sides or {}).get(name, BY_NAME[name].tail)
        rows.append((name, statistic_p_values(calibration[key(name)], np.asarray(checked[name])[idx], side)))
    p = np.array([r[1] for r in rows])
    ranges = {name: NormalRange.of(calibration[key(name)]) for name in names}
    model_names = list(model)
    model_ranges = {name: NormalRange.of(cal) for name, (_, cal, _) in model.items()}  # once, not per image
    medians = {name: float(np.median(cal)) for name, (_, cal, _) in model.items()}
    out: list[list[Reason]] = []
    for col, i in enumerate(idx):
        order = np.argsort(p[:, col], kind="stable")
        picked = [int(j) for j in order if j in order[:ATYPICAL] or (level is not None and p[j, col] <= level)]
        found = []
        for j in picked:
            check, pj = rows[j][0], float(p[j, col])
            if check == MODEL_CHECK:
                name = model_names[int(closest[col])]
                scores = model[name][0]
                side = "too high" if scores[i] >= medians[name] else "too low"
                what = "score" if name == first else f"{name} (the guard)"
                normal = model_ranges[name]
                text = f"unlike the normal images to the model: {what} {side}"
                found.append(Reason(MODEL_CHECK, float(scores[i]), pj, text, (normal.lo, normal.hi)))
                continue
            value = float(checked[check][i])
            fmt = formats[i] if i < len(formats) else ""
            text = describe(BY_NAME[check], ranges[check], value, fmt, shares)
            found.append(Reason(check, value, pj, text, (ranges[check].lo, ranges[check].hi)))
        out.append(found)
    return out


def kept(found: Sequence[Reason], cutoff: float | None) -> list[Reason]:
    """A flagged image's reasons: every finding at p <= the decision's cut-off (None, a raw score
    threshold: none), else the most atypical one alone, so that a flagged image always has one.
    `found` is sorted, most atypical first."""
    level = -1.0 if cutoff is None else cutoff + 1e-12
    return [r for r in found if r.p_value <= level] or list(found[:1])
