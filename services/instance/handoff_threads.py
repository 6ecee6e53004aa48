"""Threads of socket handoff (aube.instance.handoff): the workers that follow handed-off streams, and a kept
claim's wait for its proxy's word.

Only the standard library here: this module ships into every function image with the rest of `aube.instance`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
from collections.abc import Callable
from typing import Any

from aube.instance.handoff_wire import released

logger = logging.getLogger("aube.instance.handoff")


class Workers:
    """Daemon threads that follow streams, reused from one stream to the next. `Thread.start` waits until the new
    thread runs; on the event loop, in the middle of the client's handshake, that wait (taking the interpreter lock
    back and forth) was 0.13 ms of the time to its 101. Waking an idle worker costs the loop no wait. One worker
    starts with the listener; more start only while every one is busy (a stream, an end waiting for its ack)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 1
        self._start()

    def run(self, job: Callable[..., None], *args: Any) -> None:
        with self._lock:
            start = self._idle == 0
            if not start:
                self._idle -= 1
        self._jobs.put((job, args))
        if start:
            self._start()

    def _start(self) -> None:
        threading.Thread(target=self._work, name="aube-handoff-stream", daemon=True).start()

    def _work(self) -> None:
        while True:
            job, args = self._jobs.get()
            try:
                job(*args)
            except Exception:
                logger.exception("handoff worker failed")
            with self._lock:
                self._idle += 1


class Kept:
    """The control connection of a proxy that keeps this instance's claim, flagged, for its next client (the ack
    said "kept", aube.instance.handoff_wire). Its stream's thread waits on it (`hold`): the proxy's {"released"}
    frees the thread; the connection ending first means the proxy is gone, and then no one may account for the
    flagged claim but the instance itself, which exits (as after an unacknowledged end). A new stream taken
    meanwhile ends the wait quietly (`supersede`): the proxy holds the claim for that stream now.

    Streams are numbered as they are taken: the proxy may offer the next one before the last one's thread has
    begun to wait (it reads the ack, then calls `hold`), and that wait must then not begin at all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: socket.socket | None = None
        self._taken = 0  # streams taken so far

    def supersede(self) -> int:
        """A stream was taken: the kept connection, if any, is done with. Its number, for its own `hold`."""
        with self._lock:
            self._taken += 1
            if self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.shutdown(socket.SHUT_RDWR)
                self._conn = None
            return self._taken

    def hold(self, conn: socket.socket, stream: int) -> bool:
        """Wait while `conn`, stream number `stream`'s control connection, is the kept one; False when the proxy
        went away without releasing it. At once True when a later stream was taken already. Whether a later one
        was taken is judged by the count alone: the next stream's own wait may have begun before this one wakes."""
        with self._lock:
            if self._taken != stream:
                return True
            self._conn = conn
        outcome = released(conn)
        with self._lock:
            if self._conn is conn:
                self._conn = None
            return outcome or self._taken != stream
