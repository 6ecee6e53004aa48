"""The instances this replica has claimed, and every registry write about them: claim, release, mark unhealthy.

Each is a compare-and-set through `Registry.apply` with a transition of `aube.shared.instance_lifecycle`, made only
while the entry still shows this replica's own claim. A write whose outcome is unknown (NATS away, a leader change)
is never guessed: it is remembered in `Unsettled` and settled once the registry answers (unsettled.py).

Free means free (reliability finding 5): after a stream, or a head the instance may have taken, the instance goes
back to the pool only once it says its handler has returned (`instance_done`); one still busy after the grace, or
silent, is marked unhealthy and stopped, never handed to the next client. An instance that must not serve again
(retired, fresh per stream, unhealthy) gets a stop request to the control plane, which runs beside the client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial

import anyio
from anyio.abc import TaskGroup
from nats.aio.client import Client as NATS

from aube.proxy.handoff import HandedOff
from aube.proxy.pool import Pool
from aube.proxy.unsettled import Pending, Unsettled
from aube.shared import bus, instance_health, names
from aube.shared import instance_lifecycle as lifecycle
from aube.shared.errors import AubeError
from aube.shared.registry import REGISTRY_ERRORS, InstanceEntry, NotWritten, Registry, Unknown, Written
from aube.shared.schemas import InstanceRecord, StopInstanceReply, StopInstanceRequest
from aube.shared.settings import ProxySettings

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0  # stop requests: the control plane replies once the instance is gone
HANDLER_POLL = 0.05  # how often a proxy asks a finished stream's instance whether its handler has returned


class RegistryUnreachable(Exception):
    """A claim could not be written (its outcome is unknown and settled later)."""


async def instance_done(rec: InstanceRecord, grace: float) -> bool:
    """Whether the instance says, within `grace`, that its slot is free: the stream's handler has returned. False
    if it stays busy or cannot be asked (it is gone), so it is never handed to the next client in that state."""
    with anyio.move_on_after(grace):
        while True:
            answer = await instance_health.read(rec.address, rec.secret, timeout=REQUEST_TIMEOUT)
            if answer is None:
                return False
            if answer.get("busy") is False:
                return True
            await anyio.sleep(HANDLER_POLL)
    return False


class Holdings:
    def __init__(self, settings: ProxySettings, nc: NATS, registry: Registry, pool: Pool, tg: TaskGroup) -> None:
        self.settings = settings
        self.proxy_id = settings.proxy_id
        self.nc = nc
        self.registry = registry
        self.pool = pool
        self.tg = tg  # stop requests run beside the client that met the instance
        self.held: dict[str, InstanceEntry] = {}  # instances this replica has claimed, by key
        # Streams carried under each claim held (several when the instance was kept between streams, reserve.py).
        self.streams_carried: dict[str, int] = {}
        self.unsettled = Unsettled()  # claims and releases whose write timed out: settled when NATS answers
        # Control connections of kept claims still flagged `handed_off`, by key: the instance exits when one ends
        # before it is told {"released"} (`release`) or offered its next stream (`superseded`). docs/handoff.md.
        self.kept_controls: dict[str, HandedOff] = {}

    async def claim(self, cand: InstanceEntry) -> InstanceEntry | None:
        """free -> busy for this replica: the entry now held, or None when the race was lost.

        Raises RegistryUnreachable when nothing could be written, or the write's outcome is unknown."""
        claim = partial(lifecycle.claim, proxy_id=self.proxy_id, now=time.time(), instance_id=cand.record.instance_id)
        # Shielded: a claim written but not recorded here (cancelled awaiting the reply) would stay busy.
        with anyio.CancelScope(shield=True):
            try:
                # At most two writes: a lost race reads the entry once more and, if the instance is still free (this
                # replica's view was behind: after a registry leader change the watch lags for seconds), claims it at
                # its fresh revision; if another claim won, the re-read refuses at once and the next candidate is tried.
                # A write that times out is settled later (`unsettled`), not while the client waits: during a leader
                # change, learning its outcome (a read, then a fence) cost the client two more timeouts per attempt.
                outcome = await self.registry.apply(cand.key, claim, entry=cand, attempts=2, learn_outcome=False)
            except REGISTRY_ERRORS as e:  # nothing was written (apply raises only before its write)
                raise RegistryUnreachable(str(e)) from e
        if isinstance(outcome, Unknown):
            # The write may still land: never guessed, settled once the registry answers (unsettled.py).
            self.unsettled.add(cand.key, outcome.record, used=False, revision=outcome.revision)
            raise RegistryUnreachable(outcome.error)
        if isinstance(outcome, NotWritten):
            return None
        self.held[cand.key] = outcome.entry
        return outcome.entry

    async def release_when_done(self, slot: InstanceEntry, keep: Callable[[InstanceEntry], bool] | None = None) -> None:
        """Free means free (reliability finding 5): the instance goes back to the pool only once it says its
        stream's handler has returned; one still busy after the grace (or silent) is never handed out again.
        `keep`: offered the instance first once its handler returned (proxy/reserve.py); True keeps it claimed."""
        if not await self._handler_returned(slot):
            return
        if keep is not None and keep(slot):
            return
        await self.release(slot, used=True)

    async def settle_handed_off(
        self,
        slot: InstanceEntry,
        keeps: Callable[[InstanceEntry], bool],
        *,
        handler_returned: bool = False,
        keep_flagged: bool = False,
    ) -> InstanceEntry | Unknown | None:
        """`release_when_done` after a handed-off stream, before its instance is acknowledged. An instance that
        `keeps` would keep (reserve.py: what the relay keeps) keeps its claim: still flagged with no write
        (`keep_flagged`, below), or else unflagged (`lifecycle.keep_claim`: the one compare-and-set, in place of the
        release): that entry is returned, for the caller to keep once the instance is acknowledged. None: released
        (or drained), marked unhealthy, or no longer ours. Unknown: the registry did not answer; the claim, still
        flagged, is settled once it does (`unsettled`), and meanwhile the instance must not be acknowledged: should
        this replica die first, the flag would hold an idle instance for ever, while an instance without the ack
        exits (and its entry goes).

        `keep_flagged`: the instance holds a kept claim's control connection (it said "keeps"), so a kept claim
        stays as it is, flagged, with no write; the caller acknowledges it as kept and `hold_kept`s the connection.

        `handler_returned`: the instance said so with the stream's end, so it is not asked again (its health): it
        would answer from the same process. Should it lie, the next client's offer finds its slot still taken and
        is refused as busy (aube.instance.handoff), so exclusivity does not rest on the word."""
        if not handler_returned and not await self._handler_returned(slot):
            return None
        if not keeps(slot):
            return await self.release(slot, used=True)
        if keep_flagged and slot.record.handed_off:
            # The instance holds the control connection while kept and exits if it ends (this replica died): the
            # flag may stay, so keeping needs no write at all (`hold_kept`). A claim whose flag write did not land
            # as far as this replica knows is kept by the write below: kept unflagged, the reaper may recycle it.
            return slot
        claim = slot.record
        outcome = await self._apply(slot, partial(lifecycle.keep_claim, claim_record=claim))
        if isinstance(outcome, Written):
            log.debug("kept %s after its handed-off stream", slot.key)
            self.held[slot.key] = outcome.entry
            return outcome.entry
        if isinstance(outcome, Unknown):
            # Flagged or not, the claim is still ours: settled (released) once the registry answers, as a release is.
            log.warning("unflagging %s failed (%s); released once the registry answers", slot.key, outcome.error)
            self.unsettled.add(slot.key, claim, used=True)
            self.forget(slot)
            return outcome
        log.debug("%s not kept (%s): nothing to do", slot.key, outcome.why)
        self.forget(slot)
        return None

    async def _handler_returned(self, slot: InstanceEntry) -> bool:
        """Whether the instance says its stream's handler returned; one that does not is marked unhealthy here."""
        if await instance_done(slot.record, self.settings.handler_grace):
            return True
        await self.mark_unhealthy(slot, "handler still running after its stream")
        return False

    async def flag_handed_off(self, slot: InstanceEntry, longest: float | None) -> InstanceEntry:
        """Flag the claim `handed_off` (the instance holds the client's socket), with the end of its longest duration
        `longest` (as passed to the instance; None: none): should this replica die, the reaper leaves it alone until
        then (aube.instance.handoff). The entry as now held; as before when it was not written (the stream goes on:
        only a crash of this replica meanwhile would let the reaper recycle the instance)."""
        until = None if longest is None else time.time() + longest
        if slot.record.handed_off and until is None and slot.record.handed_off_until is None:
            return slot  # a kept claim, still flagged, and no deadline to record: nothing to write
        outcome = await self._apply(slot, partial(lifecycle.hand_off, claim_record=slot.record, until=until))
        if not isinstance(outcome, Written):
            log.warning("could not flag %s as handed off: %s", slot.key, getattr(outcome, "why", outcome))
            return slot
        if slot.key in self.held:
            self.held[slot.key] = outcome.entry
        return outcome.entry

    def carrying(self, slot: InstanceEntry) -> None:
        """A stream starts on the instance held at `slot` (counted into its `streams_served` at the release)."""
        self.streams_carried[slot.key] = self.streams_carried.get(slot.key, 0) + 1

    def hold_kept(self, slot: InstanceEntry, control: HandedOff) -> None:
        """`slot` is kept, flagged, and its instance acknowledged as kept: hold its control connection until the
        claim is released (`release` says so to the instance) or its next stream is taken (`superseded`)."""
        self.superseded(slot)
        self.kept_controls[slot.key] = control

    def superseded(self, slot: InstanceEntry) -> None:
        """A new stream was handed to `slot`'s instance: the kept control connection (if any) is done with (the
        instance closed its end when it took the stream)."""
        control = self.kept_controls.pop(slot.key, None)
        if control is not None:
            control.close()

    def forget(self, slot: InstanceEntry) -> None:
        """Stop holding `slot` without a write: its entry is gone, or someone else moved it on. A kept claim's
        control connection is closed unreleased, so its instance exits (no one may account for it)."""
        self.held.pop(slot.key, None)
        self.streams_carried.pop(slot.key, None)
        self.superseded(slot)

    async def release(self, slot: InstanceEntry, *, used: bool) -> Unknown | None:
        """busy -> free, or -> draining (and ask the control plane to stop it) when it must not serve again.

        A registry that does not answer leaves the outcome unknown (returned): the claim is settled once it answers
        again."""
        claim = slot.record
        streams = self.streams_carried.get(slot.key, 1 if used else 0)

        def release(rec: InstanceRecord) -> InstanceRecord:
            if not lifecycle.holds(rec, claim):
                raise lifecycle.Refused("release", rec, "it no longer shows this replica's claim")
            fn = self.pool.functions.get(rec.function)
            return lifecycle.release(rec, fn, time.time(), by=self.proxy_id, used=used, streams=streams)

        try:
            outcome = await self._apply(slot, release)
            if isinstance(outcome, Unknown):
                log.warning("release of %s failed (%s); settled once the registry answers", slot.key, outcome.error)
                self.unsettled.add(slot.key, claim, used=used)
                return outcome
            if isinstance(outcome, NotWritten):
                log.debug("%s not released (%s): nothing to do", slot.key, outcome.why)
            elif outcome.entry.record.state == "draining":
                rec = outcome.entry.record
                log.debug("released %s -> draining", slot.key)
                self._release_kept(slot)
                await self._stop(rec, "retired" if rec.retire else "fresh_per_stream")
            else:
                log.debug("released %s -> free", slot.key)
                self._release_kept(slot)
        finally:
            self.forget(slot)
        return None

    def _release_kept(self, slot: InstanceEntry) -> None:
        """The release of a kept claim is written: its instance is told, so it stays (and serves whoever claims it)."""
        control = self.kept_controls.pop(slot.key, None)
        if control is not None:
            control.release_kept()

    async def _apply(
        self, slot: InstanceEntry, change: Callable[[InstanceRecord], InstanceRecord]
    ) -> Written | NotWritten | Unknown:
        """`Registry.apply` from the entry as this replica holds it; a registry that cannot even be read is Unknown."""
        try:
            return await self.registry.apply(slot.key, change, entry=slot)
        except REGISTRY_ERRORS as e:
            return Unknown(slot.key, slot.record, str(e) or type(e).__name__)

    async def settle(self, pending: Pending, revision: int, record: InstanceRecord) -> None:
        """Finish an entry that still showed a claim of ours whose outcome was unknown (unsettled.py)."""
        slot = InstanceEntry(pending.key, revision, record)
        self.held[pending.key] = slot
        if pending.then == "unhealthy":
            await self.mark_unhealthy(slot, "unreachable (settled after a registry outage)")
        else:
            await self.release(slot, used=pending.used)

    async def mark_unhealthy(self, slot: InstanceEntry, reason: str = "unreachable") -> None:
        claim = slot.record

        def unhealthy(rec: InstanceRecord) -> InstanceRecord:
            if not lifecycle.holds(rec, claim):
                raise lifecycle.Refused("mark_unhealthy", rec, "it no longer shows this replica's claim")
            return lifecycle.mark_unhealthy(rec, by=self.proxy_id)

        try:
            outcome = await self._apply(slot, unhealthy)
        finally:
            self.forget(slot)
        if isinstance(outcome, Unknown):
            self.unsettled.add(slot.key, claim, used=True, then="unhealthy")
            return
        if not isinstance(outcome, Written):
            return
        # The client goes on to another instance meanwhile; the stop request runs beside it.
        self.tg.start_soon(self._stop, outcome.entry.record, reason)

    async def _stop(self, rec: InstanceRecord, reason: str) -> None:
        body = StopInstanceRequest(name=rec.function, slot=rec.slot, instance_id=rec.instance_id, reason=reason)
        try:
            await bus.request(self.nc, names.SUBJECT_STOP_INSTANCE, body, StopInstanceReply, REQUEST_TIMEOUT)
        except AubeError as e:
            log.warning("stop request for %s.%d (%s) failed: %s", rec.function, rec.slot, rec.instance_id, e)
