"""The `vae-anomaly` entry point: signals are handled before anything heavy is imported.

Importing the CLI pulls in torch (seconds). A Ctrl-C or SIGTERM in that time
must still end the process with 130 or 143 and one line, never a traceback,
so this module installs the SIGTERM handler first and imports the CLI inside
the same guard. Once a command runs, the CLI group maps the same signals
itself (see `cli._Group`), after the command's own clean-up.
"""

from __future__ import annotations

import signal
import sys
import time

# When the command started (time.perf_counter), before torch is imported: `fit`'s time budget
# counts the whole command from here. None when the CLI is run some other way (tests).
STARTED: float | None = None


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that `finally` blocks (worker pools) still run."""


def terminate(signum: int, frame: object) -> None:
    raise Terminated


def main() -> None:
    global STARTED
    STARTED = time.perf_counter()
    signal.signal(signal.SIGTERM, terminate)
    try:
        from .cli import main as cli

        cli()
    except KeyboardInterrupt:
        print("aborted (Ctrl-C)", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
