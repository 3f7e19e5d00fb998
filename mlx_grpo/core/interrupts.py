"""Ctrl-C and SIGTERM during training: the first stops the run cleanly, a second at once."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_finishing: list[bool] = []  # non-empty while a run that is stopping anyway saves its state


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by the first SIGINT or SIGTERM."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum  # what a shell reports for a process the signal ended


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn the first SIGINT/SIGTERM into `Interrupted`; exit at once on the next.

    The code catching `Interrupted` (saving a checkpoint) runs with the handler
    still installed, so a second Ctrl-C during that save ends the process
    without waiting. Outside the main thread signals cannot be caught; this
    then does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def handler(signum: int, frame: object) -> None:
        received.append(signum)
        if len(received) > 1:
            sys.stderr.write(f"\n{signal.Signals(signum).name} again: exiting without saving\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        if not _finishing:  # while stopping on an error, the save goes on; the run ends after
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def finishing() -> Iterator[None]:
    """A run stopping on an error saves its state here: a first signal does not cut the save
    short (the run ends right after it anyway); a second still exits at once."""
    _finishing.append(True)
    try:
        yield
    finally:
        _finishing.pop()
