"""Relay supervision: one claimed stream from the instance's answer to its end, and the instance's return.

Bytes move in the protocols (relay.py) or the native relay engine (native_relay.py), not here: this module starts
the relay, hands an established stream to the engine when it has one, then only watches why the stream ends, through
`Legs`, whichever engine carries it (either side closing, the engine failing, `[limits] stream_idle_timeout`,
`stream_max_duration`, a silent instance, shutdown), closes both legs, hands the instance back
(`Holdings.release_when_done`; kept for this replica's next client when it may serve again, `reserve.py`), and
writes the one canonical log line per stream. The release runs in the stream's `finally` under a shielded, bounded
scope, so cancelling the proxy still releases every instance it carries.

Hung peers: both TCP legs get keepalive and `TCP_USER_TIMEOUT` (`aube.proxy.sockopts`), which end a stream whose
peer's host vanished. A peer whose process hangs while its kernel still answers is the ping policy's: with
`[limits] ping_interval` set, the instance's server pings the client (an unanswered ping ends the stream at the
instance, which the proxy sees as the instance closing), and since a live instance then sends at least one frame
every `ping_interval`, an instance that sent nothing for `ping_interval + ping_timeout` while the client leg could
take its bytes is hung: the stream ends (`close=instance_silent`) and the instance is marked unhealthy and stopped,
never handed to the next client. This costs no per-message work: the relay's byte counter is sampled.
"""

from __future__ import annotations

import asyncio
import logging

import anyio

from aube.proxy import decisions
from aube.proxy.handoff import HandedOff
from aube.proxy.holdings import REQUEST_TIMEOUT, Holdings
from aube.proxy.metrics import Metrics
from aube.proxy.native_relay import NativeRelay
from aube.proxy.pool import Pool
from aube.proxy.relay import ClientSide, Legs, ProtocolLegs, UpstreamSide
from aube.proxy.reserve import Reserve
from aube.shared.registry import InstanceEntry, Unknown
from aube.shared.settings import ProxySettings

log = logging.getLogger(__name__)

CLOSE_GRACE = 2.0  # how long a closed side may take to flush before it is aborted


class Streams:
    def __init__(
        self,
        settings: ProxySettings,
        pool: Pool,
        metrics: Metrics,
        holdings: Holdings,
        reserve: Reserve,
        native: NativeRelay | None = None,
    ) -> None:
        self.settings = settings
        self.native = native  # moves established streams' bytes off the event loop; None: the protocols carry them
        self.pool = pool
        self.metrics = metrics
        self.holdings = holdings
        self.reserve = reserve

    async def carry(
        self, client: ClientSide, name: str, slot: InstanceEntry, upstream: UpstreamSide, head_len: int
    ) -> None:
        """Relay the stream the instance at `slot` answered until it ends; then hand the instance back."""
        rec = slot.record
        fn = self.pool.functions.get(name)
        reason = "shutdown"
        client_ip = client.client_ip  # asked while the proxy still holds the client's transport
        relay_started = anyio.current_time()
        self.metrics.streams_open[name] += 1
        self.holdings.carrying(slot)
        gone = asyncio.Event()
        legs: Legs | None = None

        def instance_gone() -> None:
            gone.set()
            client.ended.set()  # wakes `_relay`
            if legs is not None:
                legs.ended.set()

        self.pool.carried(slot, instance_gone)
        try:
            # The instance accepted the head (or refused it itself): its answer goes to the client, then whatever the
            # client sent after its head. No await between these lines: bytes must follow each other in order.
            upstream.start_relay()
            upstream.transport.write(bytes(client.buffer[head_len:]))
            client.buffer.clear()
            client.attach(upstream)
            if client.ended.is_set():
                upstream.transport.close()
            native = self.native.take(client, upstream) if self.native else None
            legs = native or ProtocolLegs(client, upstream)
            self.metrics.streams_relayed_total["native" if native else "python"] += 1
            if gone.is_set():
                legs.ended.set()
            idle, longest = decisions.stream_limits(fn)
            reason = await self._relay(legs, idle, longest, decisions.ping_bound(fn, rec), gone)
        finally:
            self.pool.forget(slot)
            self.metrics.streams_open[name] -= 1
            bound = CLOSE_GRACE + self.settings.handler_grace + 2 * REQUEST_TIMEOUT + 1
            with anyio.move_on_after(bound, shield=True):
                if legs is None:
                    legs = ProtocolLegs(client, upstream)
                await legs.close(CLOSE_GRACE)
                if reason == "instance_silent":
                    await self.holdings.mark_unhealthy(slot, "hung")
                elif reason == "instance_gone":
                    self.holdings.forget(slot)  # nothing left to release
                else:
                    await self.holdings.release_when_done(slot, keep=self.reserve.keep)
            log.info(
                "stream function=%s instance=%s slot=%d client=%s duration=%.3f bytes_in=%d bytes_out=%d close=%s",
                name,
                rec.instance_id,
                rec.slot,
                client_ip,
                anyio.current_time() - relay_started,
                legs.bytes_in if legs else 0,
                legs.bytes_out if legs else 0,
                reason,
            )

    async def carry_handed_off(self, name: str, slot: InstanceEntry, handed: HandedOff, client_ip: str) -> None:
        """Watch a stream its instance serves on the client's own socket (handoff.py) until the instance reports its
        end; then hand the instance back and acknowledge. No byte passes here.

        The instance enforces the stream's limits; the proxy cuts a stream the instance left open past one
        (`HandedOff.past_limits`: its function can stop the instance's own check). The instance then has the
        handler's grace to report the end; one that does not is marked unhealthy (its function outlives its stream).

        With a ping policy the instance must answer heartbeats within the ping bound: one silent past it is hung, as
        a relayed instance sending nothing for that long is. Its client's connection is shut down here and the
        instance marked unhealthy (stopped, never handed out again); no acknowledgement, so should it wake it exits.

        Kept (`reserve.py`) where a relayed stream's instance would be, for this replica's next client, who gets it
        with no claim write. An instance that said it "keeps" is acknowledged as kept and holds the control
        connection (`Holdings.hold_kept`; it exits should this replica die), so the claim stays flagged and nothing
        is written at all (the next stream writes only a deadline, when the function has a longest duration).
        Otherwise the flag is cleared in place of the release (one compare-and-set, `Holdings.settle_handed_off`)
        and written again once the next stream's instance took the socket."""
        rec = slot.record
        bound = decisions.ping_bound(self.pool.functions.get(name), rec)
        reason = "shutdown"
        self.metrics.streams_open[name] += 1
        self.metrics.streams_handed_off_total[name] += 1
        self.holdings.carrying(slot)
        gone = asyncio.Event()
        self.pool.carried(slot, gone.set)
        settled = False
        kept: InstanceEntry | None = None  # the claim to keep once the instance is acknowledged
        enforced: str | None = None  # the limit the proxy cut the stream for (past_limits)
        unwritten = False  # the claim's settlement is not written yet (the registry did not answer)
        held_kept = False  # the instance was acknowledged as kept: its control connection is the holdings' now
        try:
            self.holdings.superseded(slot)  # a kept claim's last control connection: this stream replaces it
            slot = await self.holdings.flag_handed_off(slot, handed.limits[1])
            async with anyio.create_task_group() as tg:

                async def end_when_gone() -> None:
                    await gone.wait()
                    log.warning("the registry no longer accounts for the instance (its entry is gone): ending")
                    handed.end("instance_gone")

                async def judge(bound: float) -> None:
                    nonlocal reason
                    await handed.hung(bound)
                    log.warning("instance answered no heartbeat for %.1fs though it pings: hung", bound)
                    reason = "instance_silent"
                    tg.cancel_scope.cancel()

                async def enforce_limits() -> None:
                    nonlocal reason, enforced
                    enforced = await handed.past_limits()
                    log.warning("handed-off stream past its %s and still open: cut by the proxy", enforced)
                    self.metrics.limits_enforced_total[(name, enforced)] += 1
                    handed.cut()
                    await anyio.sleep(self.settings.handler_grace + 2)
                    log.warning(
                        "instance reported no end %.1fs after its stream was cut: unhealthy",
                        self.settings.handler_grace + 2,
                    )
                    reason = "instance_silent"
                    tg.cancel_scope.cancel()

                tg.start_soon(end_when_gone)
                tg.start_soon(enforce_limits)
                if bound is not None:
                    tg.start_soon(judge, bound)
                reason = await handed.ended()
                tg.cancel_scope.cancel()
            if enforced is not None and reason != "instance_silent":
                reason = enforced  # the instance reports only that its connection closed
            if reason in ("instance_silent", "instance_gone"):
                handed.cut()  # hung, or its process is gone: only our copy would keep the client's connection open
            handed.let_go()
            with anyio.CancelScope(shield=True):
                settle_bound = self.settings.handler_grace + 2 * REQUEST_TIMEOUT + 1
                with anyio.move_on_after(settle_bound):
                    if reason == "instance_silent":
                        await self.holdings.mark_unhealthy(slot, "hung")
                    elif gone.is_set():
                        self.holdings.forget(slot)  # nothing left to release
                    else:
                        settlement = await self.holdings.settle_handed_off(
                            slot,
                            self.reserve.keeps,
                            handler_returned=handed.handler_returned,
                            keep_flagged=handed.keeps,
                        )
                        # Not written yet (the registry did not answer): no ack, so the instance exits rather than
                        # wait, idle and flagged, on a release this replica may die before it writes.
                        if isinstance(settlement, Unknown):
                            unwritten = True
                        else:
                            kept = settlement
                    settled = True
                # A claim kept flagged (no write, `keep_flagged`) is acknowledged as kept: the instance then holds
                # the control connection, which the holdings keep until the claim is released or used again.
                flagged = kept is not None and kept.record.handed_off
                acknowledged = (
                    settled and not unwritten and reason != "instance_silent" and await handed.acknowledge(kept=flagged)
                )
                if kept is not None and flagged and acknowledged:
                    self.holdings.hold_kept(kept, handed)
                    held_kept = True
                if kept is not None and not (acknowledged and self.reserve.keep(kept)):
                    # Not acknowledged (it exits), or the reserve closed meanwhile: released as it would have been.
                    with anyio.move_on_after(2 * REQUEST_TIMEOUT):
                        await self.holdings.release(kept, used=True)
        finally:
            self.pool.forget(slot)
            self.metrics.streams_open[name] -= 1
            if not settled:
                # Shutdown (or a release that could not finish): no acknowledgement, so the instance exits once its
                # stream ends, and the control plane drops its entry; the flagged claim is left to that.
                self.holdings.forget(slot)
            if not held_kept:
                handed.close()
            log.info(
                "stream function=%s instance=%s slot=%d client=%s duration=%.3f handed_off=1 close=%s",
                name,
                rec.instance_id,
                rec.slot,
                client_ip,
                anyio.current_time() - handed.started,
                reason,
            )

    async def _relay(
        self,
        legs: Legs,
        idle: float | None,
        longest: float | None,
        silent: float | None = None,
        gone: asyncio.Event | None = None,
    ) -> str:
        """Wait for the stream to end; why it ended. Bytes move in the relay engines, not here.

        `silent`: the instance pings, so it sending nothing for this long (while the client leg took bytes) means
        it hangs."""
        with anyio.move_on_after(longest):
            last_total = last_out = -1
            last_change = last_out_change = anyio.current_time()
            windows = [w / 4 for w in (idle, silent) if w]
            while True:
                # Idle detection samples the byte counters a few times per window instead of taking the time
                # per chunk: a stream is never closed before `idle` seconds without traffic.
                with anyio.move_on_after(min(windows) if windows else None):
                    await legs.ended.wait()
                if gone is not None and gone.is_set():
                    log.warning("the registry no longer accounts for the instance (its entry is gone): ending")
                    return "instance_gone"
                closed_by = legs.closed_by()
                if closed_by is not None:
                    return closed_by
                if legs.ended.is_set():
                    # Ended without a side's word (the engine failed or stopped): waiting again would not wait.
                    log.warning("the relay ended the stream without either side closing it")
                    return "relay_failed"
                now = anyio.current_time()
                if idle:
                    total = legs.bytes_in + legs.bytes_out
                    if total != last_total:
                        last_total, last_change = total, now
                    elif now - last_change >= idle:
                        return "idle_timeout"
                if silent:
                    # While the client leg is full the proxy stops reading the instance: its silence is then ours.
                    bytes_out = legs.bytes_out
                    if bytes_out != last_out or legs.client_full:
                        last_out, last_out_change = bytes_out, now
                    elif now - last_out_change >= silent:
                        log.warning("instance sent nothing for %.1fs though it pings: hung", now - last_out_change)
                        return "instance_silent"
        return "max_duration"
