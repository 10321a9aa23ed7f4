"""Gate rules over a scored batch: the limits a CI job sets, and whether the batch passed them.

    --gate max-count=0,binom-p=0.01

Counts and rates fail above their limit; p-value rules fail at or below
theirs, so a normal batch fails a `*-p=a` rule with probability at most a.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError, GateSpecError
from .batch_tests import BatchTest

# Gate rules: name -> (what is measured, how it fails). Counts and rates fail
# above their limit; p-value rules fail at or below theirs, so a normal batch
# fails a `*-p=a` rule with probability at most a.
GATE_RULES: dict[str, tuple[str, str]] = {
    "max-count": ("number of flagged images", "value > limit"),
    "max-rate": ("share of scored images flagged", "value > limit"),
    "shift-p": ("Mann-Whitney p: batch scores above the calibration scores", "p <= limit"),
    "binom-p": ("p of the number of images at p <= --fpr, beta-binomial", "p <= limit"),
    "drift-p": ("Mann-Whitney p: batch scores above the --baseline report's", "p <= limit"),
    "max-duplicates": ("number of images that copy an earlier image of the batch", "value > limit"),
    "max-leaks": ("number of images that copy a training image", "value > limit"),
}
COUNT_RULES = ("max-count", "max-duplicates", "max-leaks")  # whole numbers >= 0
GATE_ALIASES = {"max-anomalies": "max-count", "max-anomaly-rate": "max-rate"}


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
                if not math.isfinite(limit):
                    raise ValueError(raw)
            except ValueError:
                raise GateSpecError(f"gate rule {item!r}: the limit {raw.strip()!r} is not a finite number") from None
            if name in COUNT_RULES and (limit < 0 or limit != int(limit)):
                raise GateSpecError(f"gate rule {item!r}: {name} takes a whole number >= 0")
            if name not in COUNT_RULES and not 0 <= limit <= 1:
                raise GateSpecError(f"gate rule {item!r}: {name} takes a number between 0 and 1")
            rules = [r for r in rules if r.name != name]  # the last one given wins
            rules.append(GateRule(name, int(limit) if name in COUNT_RULES else limit))
    return rules


def evaluate_gate(
    rules: list[GateRule],
    flagged: int,
    scored: int,
    tests: dict[str, BatchTest] | None = None,
    counts: dict[str, int] | None = None,
) -> list[GateCheck]:
    """Every rule with its measured value and pass or fail; `counts` has "duplicates" and "leaks"."""
    tests = tests or {}
    counts = counts or {}
    by_rule = {"shift-p": "shift", "binom-p": "binomial", "drift-p": "drift"}
    checks = []
    for r in rules:
        name = GATE_ALIASES.get(r.name, r.name)
        if name not in GATE_RULES:
            raise ConfigError(f"unknown gate rule {r.name!r}")
        measures, fails_when = GATE_RULES[name]
        if name == "max-count":
            value = float(flagged)
        elif name == "max-rate":
            value = flagged / scored if scored else 0.0
        elif name in ("max-duplicates", "max-leaks"):
            value = float(counts.get(name.removeprefix("max-"), 0))
        else:
            test = tests.get(by_rule[name])
            if test is None:
                raise ConfigError(f"gate rule {name} needs the {by_rule[name]} test, which was not run")
            value = test.p_value
        passed = value <= r.limit + 1e-12 if fails_when == "value > limit" else value > r.limit
        checks.append(GateCheck(name, r.limit, value, passed, fails_when, measures))
    return checks


def gate_from_options(
    specs: list[str] | tuple[str, ...], max_anomalies: int | None = None, max_anomaly_rate: float | None = None
) -> list[GateRule]:
    """--gate values plus the --max-anomalies and --max-anomaly-rate shorthands, as one list of rules."""
    specs = list(specs)
    if max_anomalies is not None:
        specs.append(f"max-count={max_anomalies}")
    if max_anomaly_rate is not None:
        specs.append(f"max-rate={max_anomaly_rate!r}")
    return parse_gate(specs)
