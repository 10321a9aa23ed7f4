"""The command's process: when it started, and how Ctrl-C and SIGTERM reach it.

`launch` (the entry point) sets the start and installs the handlers before torch is imported; the CLI
reads the start (fit's budget counts the whole command) and maps the same signals once a command runs.
Both import this module, so the CLI never imports the entry point that imports it. No torch, no click.
"""

from __future__ import annotations

import contextlib
import signal
import threading
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
