"""What `score` and `merge` check alike before reading anything: the output format, the gate's needs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..decision.gate import GateRule
from ..errors import ConfigError
from ..reports import outputs
from ..reports.outputs import Outputs

Say = Callable[[str], None]


def quiet(_msg: str) -> None:
    pass


def resolved(out: Outputs) -> Outputs:
    """The outputs with their format decided (--format, or from the --output file's suffix)."""
    return replace(out, format=outputs.output_format(out.output, out.format))


def check_gate(gate: tuple[GateRule, ...], baseline: Path | None) -> None:
    if any(r.name == "drift-p" for r in gate) and baseline is None:
        raise ConfigError("gate rule drift-p compares with a previous batch: pass --baseline previous.json")
