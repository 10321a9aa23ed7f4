"""The `vae-anomaly` entry point: signals are handled before anything heavy is imported.

Importing the CLI pulls in torch (seconds). A Ctrl-C or SIGTERM in that time
must still end the process with 130 or 143 and one line, never a traceback,
so this module installs the SIGTERM handler first and imports the CLI inside
the same guard. Once a command runs, the CLI group maps the same signals
itself (see `cli._Group`), after the command's own clean-up.

A signal that lands inside torch's own import is held until the import ends
(`signals_held`): raised there, the interrupt crosses torch's C++ start-up,
which aborts the process (pybind11's `terminate`) or leaves a second, stray
KeyboardInterrupt behind, so the process died by the signal instead of 130.
"""

from __future__ import annotations

import signal
import sys
import time

from . import process
from .process import Terminated, signals_held, terminate


def main() -> None:
    process.STARTED = time.perf_counter()
    signal.signal(signal.SIGTERM, terminate)
    try:
        with signals_held():
            from .cli import main as cli

        cli()
    except KeyboardInterrupt:
        print("aborted (Ctrl-C)", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
