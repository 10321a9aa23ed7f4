"""`--config FILE` and the settings file's values as the commands' defaults; `vae-anomaly config`.

The file's values become click's `default_map` (click's own mechanism for
defaults from configuration), set by an eager `--config` option before any
other option is read, so the command line still overrides them. Keys are
checked here against the
commands' options: an unknown key is an error naming the key and the file.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..errors import ConfigError
from ..settings import COMMANDS, Settings, load
from .render import say, settings_table

F = TypeVar("F", bound=Callable[..., Any])
NOT_IN_FILES = {"config"}  # options a file cannot set


def option_keys(command: click.Command) -> dict[str, click.Option]:
    """The keys a file may set for `command`: each option's long name without its dashes."""
    keys = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.name in NOT_IN_FILES:
            continue
        long = [o for o in param.opts if o.startswith("--")]
        keys[long[0][2:] if long else str(param.name)] = param
    return keys


def _commands(ctx: click.Context, names: Iterable[str]) -> dict[str, click.Command]:
    """The group's commands by name (each imported on first use)."""
    group = ctx.find_root().command
    assert isinstance(group, click.Group)
    found = {name: group.get_command(ctx, name) for name in names}
    return {name: cmd for name, cmd in found.items() if cmd is not None}


def _unknown(settings: Settings, name: str, key: str, known: Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), 1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(
        f"{settings.origin(name, key)}: unknown key {key!r} for `vae-anomaly {name}`{hint} (keys are the long "
        f"option names of `vae-anomaly {name} --help`)"
    )


def defaults(ctx: click.Context, name: str, command: click.Command, settings: Settings) -> dict[str, Any]:
    """The file's values for `command` as click's default_map (option name -> value), each converted by
    its option's type, paths made relative to the file. Raises ConfigError for an unknown key (a
    shared key may belong to another command) or a value its option refuses."""
    keys = option_keys(command)
    others: dict[str, set[str]] | None = None
    out: dict[str, Any] = {}
    for key, value in settings.values(name).items():
        param = keys.get(key)
        if param is None:
            if key in settings.per_command.get(name, {}):
                raise _unknown(settings, name, key, keys)
            if others is None:
                others = {n: set(option_keys(c)) for n, c in _commands(ctx, COMMANDS).items()}
            if not any(key in k for k in others.values()):
                raise _unknown(settings, name, key, keys)
            continue  # another command's option
        if param.multiple and isinstance(value, (str, int, float)):
            value = [value]
        _check_kind(settings, name, key, param, value)
        if isinstance(param.type, click.Path):
            value = [settings.resolve(str(v)) for v in value] if param.multiple else settings.resolve(str(value))
        try:
            out[str(param.name)] = param.type_cast_value(ctx, value)
        except click.BadParameter as exc:
            raise ConfigError(f"{settings.origin(name, key)}: {key} = {value!r}: {exc.message}") from None
    return out


def _check_kind(settings: Settings, name: str, key: str, param: click.Option, value: Any) -> None:
    """A file's value of the kind its option takes, as the command line would: a list only for an option
    given several times, never a table or a date; true/false for a flag; a whole number for a count
    (2.7 is not silently 2). Raises ConfigError naming the key and the file."""
    values = value if param.multiple and isinstance(value, list) else [value]
    wanted = "true or false" if param.is_flag else "a number or a string"
    for v in values:
        if param.is_flag and not isinstance(v, bool):
            bad = True
        elif isinstance(param.type, (click.types.IntParamType, click.IntRange)):
            bad = isinstance(v, bool) or not (
                isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit())
            )
            wanted = "a whole number"
        else:
            bad = not isinstance(v, (str, int, float))  # a table, a date, a list where one value goes
        if bad:
            raise ConfigError(
                f"{settings.origin(name, key)}: {key} = {v!r} ({type(v).__name__}): `--{key}` takes {wanted}; fix "
                "the settings file"
            )


def config_option(fn: F) -> F:
    """--config FILE (eager): the settings file's values become the command's defaults; without it, the
    nearest vae-anomaly.toml or pyproject.toml [tool.vae-anomaly] (settings.py)."""

    def apply(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
        settings = load(value)
        name = ctx.info_name or ctx.command.name or ""
        from_file = defaults(ctx, name, ctx.command, settings)
        ctx.default_map = {**(ctx.default_map or {}), **from_file}
        if from_file and settings.path is not None:  # a file in a parent folder never applies unseen
            keys = [k for k, p in option_keys(ctx.command).items() if str(p.name) in from_file]
            say(f"settings from {settings.path}: {', '.join(keys)} (options given here override them)")

    option = click.option(
        "--config",
        type=click.Path(dir_okay=False, path_type=Path),
        is_eager=True,
        expose_value=False,
        callback=apply,
        help="Read defaults from this TOML file (default: the nearest vae-anomaly.toml, or pyproject.toml with "
        "[tool.vae-anomaly]); options given here override it. `vae-anomaly config` shows the result.",
    )
    return option(fn)


def _plain(value: Any) -> Any:
    """A resolved value as JSON and tables show it."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) else None  # None: unset (click's sentinel)


def resolved(ctx: click.Context, names: Iterable[str], settings: Settings) -> dict[str, dict[str, dict[str, Any]]]:
    """Every option of each named command: its value and where it came from ("default", or the file and
    table)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, command in _commands(ctx, names).items():
        sub = click.Context(command, info_name=name, parent=ctx)
        from_file = defaults(sub, name, command, settings)
        rows = {}
        for key, param in option_keys(command).items():
            if str(param.name) in from_file:
                value, origin = from_file[str(param.name)], settings.origin(name, key)
            else:
                value, origin = param.get_default(sub, call=True), "default"
            rows[key] = {"value": _plain(value), "origin": origin}
        out[name] = rows
    return out


@click.command()
@click.argument("commands", nargs=-1, type=click.Choice(COMMANDS))
@click.option("--config", "path", type=click.Path(dir_okay=False, path_type=Path), help="This file, not the nearest.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--all", "show_all", is_flag=True, help="Also list the options left at their defaults.")
@click.pass_context
def config(ctx: click.Context, commands: tuple[str, ...], path: Path | None, fmt: str, show_all: bool) -> None:
    """Show the settings fit, score, merge and evaluate would use here, and where each came from.

    \b
      vae-anomaly config score
      vae-anomaly config --all --format json
    """
    settings = load(path)
    table = resolved(ctx, commands or COMMANDS, settings)
    if not show_all:
        table = {n: {k: v for k, v in rows.items() if v["origin"] != "default"} for n, rows in table.items()}
    if fmt == "json":
        click.echo(
            json.dumps({"file": None if settings.path is None else str(settings.path), "commands": table}, indent=2)
        )
    else:
        settings_table(None if settings.path is None else str(settings.path), table)
