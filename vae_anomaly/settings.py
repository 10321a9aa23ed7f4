"""Defaults from a file: `vae-anomaly.toml`, or `[tool.vae-anomaly]` in `pyproject.toml`.

A CI job or a pre-commit hook should not repeat every option on every call,
and a team should keep its gate next to its data. As ruff, pytest and mypy
do, the nearest file wins: from the working folder up to the root, the first
folder holding `vae-anomaly.toml` (the whole file) or a `pyproject.toml` with
a `[tool.vae-anomaly]` table; `--config FILE` names one instead. Keys are the
commands' long option names (`fpr`, `gate`, `time-budget`, `no-cache`);
top-level keys apply to every command that has the option, a table per
command (`[score]`, `[fit]`, or `[tool.vae-anomaly.score]`) overrides them
for that command. Options given on the command line override the file.
Paths in the file are relative to its folder. Which keys a command knows is
the CLI's business (cli/settings.py); this module finds, parses and reports
where each value came from. TOML is parsed by the standard library
(`tomllib`; `tomli`, the same parser, on Python 3.10).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

OWN_FILE = "vae-anomaly.toml"
PYPROJECT = "pyproject.toml"
TOOL = "vae-anomaly"  # the [tool.*] table of pyproject.toml
COMMANDS = ("fit", "score", "merge", "evaluate")  # commands that read the file, each may have a table


@dataclass(frozen=True)
class Settings:
    """The values of one file: `shared` for every command, `per_command` overriding them. `path` is
    None where no file was found (every value is then the command's own default)."""

    path: Path | None = None
    shared: Mapping[str, Any] = field(default_factory=dict)
    per_command: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def values(self, command: str) -> dict[str, Any]:
        """The file's values for `command`, its own table over the shared keys."""
        return {**self.shared, **self.per_command.get(command, {})}

    def origin(self, command: str, key: str) -> str | None:
        """Where `key` of `command` comes from: "FILE [table]", or None where the file does not set it."""
        if self.path is None:
            return None
        if key in self.per_command.get(command, {}):
            return f"{self.path} [{self._table(command)}]"
        if key in self.shared:
            return f"{self.path} [{self._table(None)}]"
        return None

    def _table(self, command: str | None) -> str:
        base = f"tool.{TOOL}" if self.path is not None and self.path.name == PYPROJECT else ""
        name = ".".join(part for part in (base, command) if part)
        return name or "top level"

    def resolve(self, value: str) -> str:
        """A path from the file, relative to the file's folder."""
        if self.path is None or Path(value).is_absolute():
            return value
        return str(self.path.parent / value)


def _table_of(path: Path) -> dict[str, Any] | None:
    """The settings table of `path`, or None where a pyproject.toml has none. Raises ConfigError."""
    try:
        with path.open("rb") as f:
            doc: dict[str, Any] = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read the settings file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}; fix the file or name another with --config") from None
    if path.name != PYPROJECT:
        return doc
    tool = doc.get("tool", {})
    if not isinstance(tool, dict):
        raise ConfigError(f"{path}: `tool` must be a table ([tool]), got {type(tool).__name__}; fix the file")
    table: dict[str, Any] | None = tool.get(TOOL)
    if table is not None and not isinstance(table, dict):
        raise ConfigError(f"{path}: [tool.{TOOL}] must be a table, got {type(table).__name__}")
    return table


def _nearest(start: Path) -> tuple[Path, dict[str, Any]] | None:
    """The nearest settings file from `start` up to the root and its table, each file parsed once."""
    for folder in (start.resolve(), *start.resolve().parents):
        for candidate in (folder / OWN_FILE, folder / PYPROJECT):
            table = _table_of(candidate) if candidate.is_file() else None
            if table is not None:
                return candidate, table
    return None


def find(start: Path) -> Path | None:
    """The nearest settings file from `start` up to the root: `vae-anomaly.toml`, or a pyproject.toml
    with a [tool.vae-anomaly] table (the first of the two in the same folder)."""
    found = _nearest(start)
    return None if found is None else found[0]


def load(path: Path | None = None, start: Path | None = None) -> Settings:
    """The settings of `path`, or of the nearest file from `start` (default: the working folder).
    Raises ConfigError for a missing or malformed file, a table for no command, or a non-table."""
    if path is not None and not path.is_file():
        raise ConfigError(f"settings file {path} not found; check the --config path")
    nearest = (path, _table_of(path)) if path is not None else _nearest(start or Path.cwd())
    if nearest is None:
        return Settings()
    found, table = nearest
    if table is None:
        raise ConfigError(f"{found} has no [tool.{TOOL}] table; add one or name a {OWN_FILE} with --config")
    shared, per_command = {}, {}
    for key, value in table.items():
        if isinstance(value, dict):
            if key not in COMMANDS:
                raise ConfigError(f"{found}: unknown table [{key}]; tables are per command: {', '.join(COMMANDS)}")
            per_command[key] = dict(value)
        else:
            shared[key] = value
    return Settings(found.resolve(), shared, per_command)
