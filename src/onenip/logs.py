"""Messages and progress: onenip's modules log through `logging` (logger names under "onenip") and show progress with
tqdm; a library user silences or routes them like any other logger's (`logging.getLogger("onenip").setLevel(...)`).
The command line prints them as plain lines (see `onenip.cli`).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm

# Seconds between two redraws of a progress bar on a terminal (at least; at most 10, tqdm's default), and where the
# output is a file or a CI log (no terminal), where every redraw is a new line: there the bar is redrawn once a minute.
TERMINAL_INTERVAL = 0.1
LOG_INTERVAL = 60.0


def progress_bar(iterable: Iterable | None = None, *, desc: str, unit: str, total: int | None = None,
                 disable: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr (over `iterable`, or updated by hand up to `total`) that redraws rarely when stderr is not
    a terminal."""
    terminal = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, leave=True,
                mininterval=TERMINAL_INTERVAL if terminal else LOG_INTERVAL,
                maxinterval=10.0 if terminal else LOG_INTERVAL, **kwargs)


@contextmanager
def stop_on_sigint() -> Iterator[Callable[[], bool]]:
    """Within the block, a first Ctrl-C (SIGINT) only asks to stop: the function yielded returns True from then on,
    and the caller stops at a safe point. A second Ctrl-C raises KeyboardInterrupt as usual. Outside the main thread
    (where Python cannot install a handler) Ctrl-C behaves as usual."""
    asked = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield asked.is_set
        return

    def handler(signum: int, frame: Any) -> None:
        if asked.is_set():
            raise KeyboardInterrupt
        asked.set()
        print("onenip: stopping after this step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield asked.is_set
    finally:
        signal.signal(signal.SIGINT, previous)
