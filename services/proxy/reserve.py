"""Instances this replica holds claimed for its next clients: reserved ahead of demand, and kept after a stream.
Either way a client is served from one with no registry round trip on its critical path.

Kept after a stream: its instance stays claimed by this replica for up to `reserve_seconds` (instead of going back to
the pool by a compare-and-set) and goes to the replica's next client of the function directly. After a handed-off
stream alike (`keeps` decides for both): the instance is kept once it was acknowledged as kept, its claim still
flagged `handed_off` while it holds the control connection (or, for an instance that cannot, unflagged by one
compare-and-set): streams.py, docs/handoff.md. Reserved ahead of demand
(`reserve`, docs/reservations.md): the replica claims up to `reserve` free instances per function before any client
asks (`decisions.reservations_to_take`), and holds them until a client takes one. A kept instance that expires
while the function holds fewer than `reserve` stays on as a reservation; the rest are released as before.
So a registry between leaders (nats-server's followers wait 4 to 9 s for a lost leader before they elect another)
does not stop clients that a held instance can serve.

A reservation is an ordinary claim (instance_lifecycle.claim, this replica's lease), so every rule sees it:
- exclusivity: the registry shows it busy and claimed by this replica, so no other replica claims it, and this
  replica hands it to one client at a time (`take` removes it before it is handed out);
- scaling: the control plane's keeper counts it busy, not warm, so it tops the warm pool back up to `min_free`
  (bounded: at most `reserve` per function per replica, none at `max_instances`); this replica's own scale
  decisions count what it holds as free (it serves its clients first);
- retirement: a new version, a delete or a retire flag gives it back at once (`decisions.reservation_fate`), and the
  release drains it, so retirement stops the old version without waiting for it;
- a dead replica: the reaper drains its claims once its lease is dead, reservations among them, and the keeper
  replaces them; except a claim kept flagged after a handed-off stream, which the reaper leaves alone: its
  instance exits once the replica's control connection ends (the process died), so a replica that is only
  paused, or cut off from NATS, holds such instances until it resumes (docs/handoff.md);
- other replicas: none is held for a function at `max_instances` (past `reserve_seconds` after a stream) or with
  `min_free = 0`, where a free instance may be the one another replica's client waits for.

A held instance is handed out only while its fate is "keep" and this replica's lease was renewed within half its
ttl: a replica cut off from NATS for longer may be judged dead, and its claims drained under the next stream.
On shutdown every held instance is released.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

import anyio
import msgspec

from aube.proxy import decisions
from aube.proxy.holdings import Holdings, RegistryUnreachable
from aube.proxy.pool import Pool
from aube.shared import instance_lifecycle as lifecycle
from aube.shared.registry import InstanceEntry
from aube.shared.schemas import FunctionRecord

log = logging.getLogger(__name__)

TEND_POLL = 0.25  # how often held instances are checked (expiry, fate) and reservations topped up
RELEASE_BOUND = 10.0  # seconds the final release of held instances may take on shutdown


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
        ahead: int = 0,
    ) -> None:
        self.seconds = seconds
        self.ahead = ahead  # reservations per function held ahead of demand (AUBE_RESERVE)
        self.pool = pool
        self.holdings = holdings
        self.lease_fresh = lease_fresh
        self.on_kept = on_kept  # wakes a client of that function waiting in line
        self.kept: dict[str, list[Kept]] = {}  # function -> held instances, oldest first
        self.topping: set[str] = set()  # functions with reservations being claimed now
        # Something changed since the last top-up (the view, or what is held): only then are the functions scanned.
        self.dirty = True
        self.closed = False
        pool.listeners.append(self._changed)

    def _changed(self) -> None:
        self.dirty = True

    def count(self, function: str) -> int:
        return len(self.kept.get(function, ()))

    def keeps(self, slot: InstanceEntry) -> bool:
        """Whether `keep` would keep `slot` now: the one decision, for relayed and handed-off streams alike (a
        handed-off one's claim is settled first, `Holdings.settle_handed_off`, then kept)."""
        rec = slot.record
        if self.closed or (self.seconds <= 0 and self.ahead <= 0):
            return False
        return lifecycle.reusable(self.pool.function(rec.function), rec)

    def keep(self, slot: InstanceEntry) -> bool:
        """Keep `slot` (its stream ended, its handler returned) for the next client; False: release it now."""
        if not self.keeps(slot):
            return False
        self._hold(slot.record.function, slot)
        return True

    def _hold(self, function: str, slot: InstanceEntry) -> None:
        self.kept.setdefault(function, []).append(Kept(slot, time.monotonic()))
        self.on_kept(function)

    def take(self, function: str) -> InstanceEntry | None:
        """The most recently held instance of `function` that may serve now, or None. Those that may not are
        released (a retired or older one: draining) or forgotten (gone, or moved on by someone else)."""
        kept = self.kept.get(function)
        fresh = self.lease_fresh()
        fn = self.pool.function(function)
        while kept:
            self.dirty = True
            entry = kept.pop().entry
            if not kept:
                del self.kept[function]
            fate = decisions.reservation_fate(fn, entry, self.pool.entries.get(entry.key))
            if fate == "forget":
                self.holdings.forget(entry)
                continue
            if fresh and fate == "keep":
                return entry
            self.holdings.tg.start_soon(self._release, entry)
        return None

    async def _release(self, entry: InstanceEntry) -> None:
        # A reservation that never carried a stream goes back as unused (not counted as served, not drained when the
        # function wants a fresh instance per stream).
        await self.holdings.release(entry, used=entry.key in self.holdings.streams_carried)

    def tend(self) -> None:
        """One pass over what is held: give back what must go (`decisions.reservation_fate`), release what was
        kept after a stream longer than `seconds` beyond the `ahead` reservations, and claim the missing ones."""
        cutoff = time.monotonic() - self.seconds
        for function in list(self.kept):
            fn = self.pool.function(function)
            held: list[Kept] = []
            for k in self.kept[function]:
                fate = decisions.reservation_fate(fn, k.entry, self.pool.entries.get(k.entry.key))
                if fate == "forget":
                    self.holdings.forget(k.entry)
                elif fate == "give_back":
                    log.info("giving back reserved %s (%s)", k.entry.key, k.entry.record.instance_id)
                    self.holdings.tg.start_soon(self._release, k.entry)
                else:
                    held.append(k)
            # Oldest first: those kept past `seconds` go, except the newest few, which stay on as reservations.
            target = 0 if fn is None else decisions.reservation_target(fn, self._counts(fn), self.ahead)
            while len(held) > target and held[0].since <= cutoff:
                self.holdings.tg.start_soon(self._release, held.pop(0).entry)
            if held:
                self.kept[function] = held
            else:
                del self.kept[function]
        if self.ahead > 0 and self.dirty and not self.closed and self.lease_fresh():
            self.dirty = False
            for fn in list(self.pool.functions.values()):
                self._top_up(fn)

    def _counts(self, fn: FunctionRecord) -> decisions.PoolCounts:
        # Our own fresh claims may not be in the view yet (the watch lags): count them as the busy ones they are.
        held = self.holdings.held
        return decisions.counts(fn, [held.get(e.key, e) for e in self.pool.entries_of(fn.name)])

    def _top_up(self, fn: FunctionRecord) -> None:
        if fn.name in self.topping:
            return
        count = decisions.reservations_to_take(fn, self._counts(fn), held=self.count(fn.name), setting=self.ahead)
        if count > 0:
            self.topping.add(fn.name)
            self.holdings.tg.start_soon(self._reserve, fn, count)

    async def _reserve(self, fn: FunctionRecord, count: int) -> None:
        """Claim up to `count` free instances of `fn` as reservations (ordinary claims, compare-and-set)."""
        try:
            skip = frozenset(self.holdings.held)
            for cand in decisions.candidates(fn, self.pool.entries_of(fn.name), salt=uuid.uuid4().hex, skip=skip):
                if count <= 0:
                    break
                entry = await self.holdings.claim(cand)
                if entry is None:
                    continue  # lost the race (a client, another replica): the next one
                if self.closed:
                    await self._release(entry)
                    return
                log.debug("reserved %s (%s)", entry.key, entry.record.instance_id)
                self._hold(fn.name, entry)
                count -= 1
        except RegistryUnreachable as e:
            log.debug("reserving %s: the registry is unreachable (%s)", fn.name, e)
        finally:
            self.topping.discard(fn.name)
            self.dirty = True  # a lost race or an unreachable registry: look again next pass

    async def run(self) -> None:
        """Tend what is held every TEND_POLL seconds, until cancelled; then release everything held."""
        try:
            while True:
                await anyio.sleep(TEND_POLL)
                self.tend()
        finally:
            self.closed = True
            remaining = [k.entry for kept in self.kept.values() for k in kept]
            self.kept = {}
            with anyio.move_on_after(RELEASE_BOUND, shield=True):
                async with anyio.create_task_group() as tg:
                    for entry in remaining:
                        tg.start_soon(self._release, entry)
