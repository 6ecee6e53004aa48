"""Instances this replica keeps claimed between streams, for its next client: served with no registry round trip.

After a stream whose handler returned, its instance used to go back to the pool by a compare-and-set (free), and the
next client's claim was another. Now the replica keeps its claim for up to `reserve_seconds` and hands the instance
to its next client of the function directly: no registry write on that client's path, so a registry between leaders
(nats-server's followers wait 4 to 9 s for a lost leader before they elect another) does not stop clients that a
kept instance can serve. One not taken within `reserve_seconds` is released as before.

Exclusivity does not change: the registry shows a kept instance busy and claimed by this replica the whole time, so
no other replica can claim it, and this replica hands it to one client at a time. A kept instance is handed out only
while
- the function, as this replica sees it, would let a released instance serve again (`lifecycle.reusable`: not
  retired, the current version, not deleting, not fresh per stream); else it is released now (which drains it);
- its entry in the view still names it and is not draining or unhealthy (the reaper or the control plane moved it);
- this replica's lease was renewed within half its ttl: a replica cut off from NATS for longer may be judged dead,
  and its claims drained and stopped under the next stream.

What others see: the control plane's keeper counts a kept instance as busy, so a function's warm pool may exceed
`min_free` by the instances kept, for `reserve_seconds`; the surplus is then reaped as idle. This replica's own scale
decisions count kept instances as free. On shutdown every kept instance is released.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import anyio
import msgspec

from aube.proxy.holdings import Holdings
from aube.proxy.pool import Pool
from aube.shared import instance_lifecycle as lifecycle
from aube.shared.registry import InstanceEntry

log = logging.getLogger(__name__)

EXPIRY_POLL = 0.25
RELEASE_BOUND = 10.0  # seconds the final release of kept instances may take on shutdown


class Kept(msgspec.Struct, frozen=True):
    entry: InstanceEntry
    since: float  # time.monotonic()


class Reserve:
    def __init__(
        self,
        seconds: float,
        pool: Pool,
        holdings: Holdings,
        *,
        lease_fresh: Callable[[], bool],
        on_kept: Callable[[str], None],
    ) -> None:
        self.seconds = seconds
        self.pool = pool
        self.holdings = holdings
        self.lease_fresh = lease_fresh
        self.on_kept = on_kept  # wakes a client of that function waiting in line
        self.kept: dict[str, list[Kept]] = {}  # function -> kept instances, oldest first
        self.closed = False

    def count(self, function: str) -> int:
        return len(self.kept.get(function, ()))

    def keep(self, slot: InstanceEntry) -> bool:
        """Keep `slot` (its stream ended, its handler returned) for the next client; False: release it now."""
        rec = slot.record
        if self.closed or self.seconds <= 0 or not lifecycle.reusable(self.pool.function(rec.function), rec):
            return False
        self.kept.setdefault(rec.function, []).append(Kept(slot, time.monotonic()))
        self.on_kept(rec.function)
        return True

    def take(self, function: str) -> InstanceEntry | None:
        """The most recently kept instance of `function` that may serve now, or None. Those that may not are
        released (a retired or older one: draining) or forgotten (gone, or moved on by someone else)."""
        kept = self.kept.get(function)
        fresh = self.lease_fresh()
        while kept:
            entry = kept.pop().entry
            if not kept:
                del self.kept[function]
            current = self.pool.entries.get(entry.key)
            if current is None or current.record.instance_id != entry.record.instance_id:
                self._forget(entry)  # gone: nothing to release
                continue
            if current.record.state in ("draining", "unhealthy"):
                self._forget(entry)  # moved on by the reaper or the control plane
                continue
            if fresh and lifecycle.reusable(self.pool.function(function), entry.record):
                return entry
            self.holdings.tg.start_soon(self._release, entry)
        return None

    def _forget(self, entry: InstanceEntry) -> None:
        self.holdings.forget(entry)

    async def _release(self, entry: InstanceEntry) -> None:
        await self.holdings.release(entry, used=True)

    async def run(self) -> None:
        """Release what was kept longer than `seconds`, until cancelled; then release everything kept."""
        try:
            while True:
                await anyio.sleep(EXPIRY_POLL)
                cutoff = time.monotonic() - self.seconds
                for function in list(self.kept):
                    expired = [k for k in self.kept[function] if k.since <= cutoff]
                    if not expired:
                        continue
                    self.kept[function] = [k for k in self.kept[function] if k.since > cutoff]
                    if not self.kept[function]:
                        del self.kept[function]
                    for k in expired:
                        self.holdings.tg.start_soon(self._release, k.entry)
        finally:
            self.closed = True
            remaining = [k.entry for kept in self.kept.values() for k in kept]
            self.kept = {}
            with anyio.move_on_after(RELEASE_BOUND, shield=True):
                async with anyio.create_task_group() as tg:
                    for entry in remaining:
                        tg.start_soon(self._release, entry)
