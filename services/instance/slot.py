"""The instance's one stream slot: who holds it, whether it is busy, how many streams it has carried.

A stream claims the slot during its opening handshake, once the server knows it will answer 101, and holds it
until its handler has returned and the connection is closed. Between the claim and the handler starting the
claim is "pending"; should the handshake die there (the peer sent its request and left at once), no handler ever
releases it: its connection gives it back when it closes (`abandon`), and a pending claim older than
`pending_timeout` counts as free in any case. This is a backstop only: the proxy's registry claim is the real
exclusivity.

Pure logic (no I/O); a lock makes it safe for the thread-per-connection sync server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class StreamSlot:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic, pending_timeout: float = 10.0) -> None:
        self._clock = clock
        self._pending_timeout = pending_timeout
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)  # notified whenever the slot is given back
        self._owner: object | None = None
        self._pending_since: float | None = None  # None once the owner's handler runs
        self._served = 0

    def _free_locked(self) -> bool:
        if self._owner is None:
            return True
        if self._pending_since is not None and self._clock() - self._pending_since > self._pending_timeout:
            self._owner = None
            self._pending_since = None
            return True
        return False

    @property
    def busy(self) -> bool:
        with self._lock:
            return not self._free_locked()

    @property
    def owner(self) -> object | None:
        """Who holds the slot (a connection), or None."""
        with self._lock:
            return None if self._free_locked() else self._owner

    @property
    def streams_served(self) -> int:
        """Streams whose handler started (the one running now included)."""
        with self._lock:
            return self._served

    def try_claim(self, owner: object) -> bool:
        """Claim the slot for a stream whose handshake is about to succeed; False if it is taken."""
        with self._lock:
            if self._owner is owner:
                return True
            if not self._free_locked():
                return False
            self._owner = owner
            self._pending_since = self._clock()
            return True

    def start(self, owner: object) -> bool:
        """The owner's handler runs: its claim no longer expires. False if `owner` does not hold the slot."""
        with self._lock:
            if self._owner is not owner:
                # Its pending claim expired and someone else took the slot, or it never claimed.
                if not self._free_locked():
                    return False
                self._owner = owner
            self._pending_since = None
            self._served += 1
            return True

    def release(self, owner: object) -> None:
        with self._lock:
            if self._owner is owner:
                self._owner = None
                self._pending_since = None
                self._freed.notify_all()

    def wait_free(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the slot to be free (a stream's handler to return); whether it is."""
        with self._lock:
            return self._freed.wait_for(self._free_locked, timeout)

    def abandon(self, owner: object) -> None:
        """`owner`'s connection closed: a claim of it still pending (its handshake died, so no handler will run)
        is released now rather than when it expires. A claim whose handler runs is the handler's to release."""
        with self._lock:
            if self._owner is owner and self._pending_since is not None:
                self._owner = None
                self._pending_since = None
                self._freed.notify_all()

    def health(self, instance_id: str) -> dict[str, object]:
        with self._lock:
            busy = not self._free_locked()
            served = self._served
        return {"status": "ok", "busy": busy, "streams_served": served, "instance": instance_id}
