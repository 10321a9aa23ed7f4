"""Field validators every config uses: the range allowed and the value received, in one ConfigError."""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError


def check_int(name: str, value: Any, lo: int, hi: int | None = None, *, none: bool = False) -> None:
    """A whole number in [lo, hi] (None allowed with `none`); ConfigError names the field and the value."""
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        allowed = f"a whole number >= {lo}" if hi is None else f"a whole number from {lo} to {hi}"
        raise ConfigError(f"{name} must be {allowed}{' or None' if none else ''}, got {value!r}")


def check_float(
    name: str,
    value: Any,
    lo: float,
    hi: float,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    none: bool = False,
) -> None:
    """A finite number in the interval given; NaN and infinities are refused (they compare false to everything)."""
    if value is None and none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ConfigError(f"{name} must be a number in {interval}{' or None' if none else ''}, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def check_device(value: Any) -> None:
    ok = value in ("auto", "cpu", "cuda") or (
        isinstance(value, str) and value.startswith("cuda:") and value[5:].isdigit()
    )
    if not ok:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
