"""Shutting an instance down on SIGTERM/SIGINT: the server is asked to stop, and the process exits regardless once
the grace has passed.

Apart from the servers (`server.py`) because it is about the process, not about streams: it must end an instance
whose function never returns (stuck in a loop or a blocking call), and the command runtime's children with it.
Only the standard library here: this module ships into every function image with the rest of `aube.instance`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType


class Stopper:
    """SIGTERM/SIGINT: ask the server to stop, and exit regardless once `grace` has passed.

    The signal handler only sets a flag, runs the registered wake-up and writes one byte to a pipe: it takes
    no lock, since it interrupts whatever the main thread holds. A watchdog thread blocked on that pipe ends
    the process if the server does not come down in time (a function stuck in a loop or in a blocking call).
    """

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.requested = False
        self.wake: Callable[[], object] | None = None
        self._r, self._w = os.pipe()
        threading.Thread(target=self._watchdog, name="aube-watchdog", daemon=True).start()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            self._exit_now()
        self.stop()

    def stop(self) -> None:
        """What SIGTERM does, from any thread (a handed-off stream ended with no proxy to account for it)."""
        self.requested = True
        os.write(self._w, b"x")
        if self.wake is not None:
            self.wake()

    def _watchdog(self) -> None:
        os.read(self._r, 1)
        time.sleep(self.grace)
        self._exit_now()

    @staticmethod
    def _exit_now() -> None:
        from aube.instance.command import kill_all

        kill_all()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(0)

    def wait(self) -> None:
        # A plain sleep loop: the handler runs between two sleeps; an Event would need a lock it may hold.
        while not self.requested:
            time.sleep(0.1)
