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

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator

# When the command started (time.perf_counter), before torch is imported: `fit`'s time budget
# counts the whole command from here. None when the CLI is run some other way (tests).
STARTED: float | None = None


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that `finally` blocks (worker pools) still run."""


def terminate(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, then raise the first one that came.

    For imports of compiled libraries (torch): they must never see the signal mid-way.
    Outside the main thread signals cannot be handled, so the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, lambda signum, frame: arrived.append(signum)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if signal.SIGTERM in arrived:
        raise Terminated
    if arrived:
        raise KeyboardInterrupt


def main() -> None:
    global STARTED
    STARTED = time.perf_counter()
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
