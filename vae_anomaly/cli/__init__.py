"""The `vae-anomaly` command: a thin click layer over the library.

Each command parses its options into one config object, calls one library
function, renders the result (rich tables on stdout; progress, warnings and
errors on stderr) and exits with the outcome's code. Every deliberate error
of the library is a `VaeAnomalyError`; this group maps it, in one place, to
an `Error:` line and its `exit_code` (see errors.py), and Ctrl-C and SIGTERM
to 130 and 143. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import sys
from typing import Any

import click

from .. import __version__
from ..errors import VaeAnomalyError
from ..process import Terminated, signals_held, terminate

# Each command's module, imported when the command runs (click's lazy-loading pattern): `score`
# then starts without `evaluate`'s scikit-learn, about 0.7 s of every CI job's start-up.
_COMMANDS = {
    "fit": "fit",
    "score": "score",
    "merge": "score",
    "evaluate": "evaluate",
    "info": "info",
    "config": "settings",
}


class _Group(click.Group):
    """Every command's outcome to an exit code: library errors, Ctrl-C (130) and SIGTERM (143)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _COMMANDS:
            return None
        with signals_held():  # the command's module imports torch
            module = importlib.import_module(f".{_COMMANDS[cmd_name]}", __name__)
        command: click.Command = getattr(module, cmd_name)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        _written().clear()  # no import here: a Ctrl-C during one would escape as a traceback
        previous = None
        with contextlib.suppress(ValueError):  # not the main thread (an embedding application)
            previous = signal.signal(signal.SIGTERM, terminate)
        try:
            return super().invoke(ctx)
        except VaeAnomalyError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo(f"aborted (Ctrl-C); {_outputs_left()}", err=True)
            ctx.exit(128 + signal.SIGINT)
        except Terminated:
            click.echo(f"terminated (SIGTERM); {_outputs_left()}", err=True)
            ctx.exit(128 + signal.SIGTERM)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _written() -> list[str]:
    """The files this process wrote (`outputs.WRITTEN`), or none where outputs.py was never imported."""
    module = sys.modules.get("vae_anomaly.reports.outputs")
    written: list[str] = getattr(module, "WRITTEN", [])
    return written


def _outputs_left() -> str:
    """What an interrupted command leaves: no file half written; which ones are new, if any."""
    written = _written()
    if not written:
        return "no output was written or left half written"
    return (
        f"written before it, each whole: {', '.join(written)}; any other output asked for was not written (an "
        "earlier run's file of that name is unchanged)"
    )


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vae-anomaly")
def main() -> None:
    """Flag images that do not look like a folder of known-normal ones.

    \b
      vae-anomaly fit ./normal_imgs -o model.vae
      vae-anomaly score ./incoming --model model.vae --threshold auto
    """
