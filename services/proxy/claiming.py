"""Claiming: getting a client an instance that has taken its head, or the reason it gets none.

The first client finding no one waiting tries every free instance (in the order `decisions.candidates` gives); a client
that must wait joins the function's queue (waiting.py) and tries only the instance offered to it, first come, first
served. Each try is a compare-and-set claim (`Holdings.claim`), then a connection to the instance, which is sent the
client's head unchanged (plus X-Forwarded-For and the instance credential). The instance's own 101 answer (or its
own refusal) is what reaches the client, so subprotocols and extensions are negotiated end to end. An instance that
answers "busy" or cannot be reached is set aside and the next one is tried: the client never sees an instance's own
503. No instance within the claim timeout, or a registry that cannot be written, is a `Refusal` (503 with
Retry-After) for the gateway to send.

Scale asks: whenever a client claims or waits, the pure `decisions.scale_count` says whether the function needs more
instances; one ask per function per cooldown, across replicas (a scale intent in the registry), runs beside the
waiting clients, who claim each new instance as it turns free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Literal

import anyio
import msgspec
from anyio.abc import TaskGroup
from nats.aio.client import Client as NATS

from aube.proxy import decisions, handoff, handshake, sockopts
from aube.proxy.holdings import REQUEST_TIMEOUT, Holdings, RegistryUnreachable
from aube.proxy.metrics import Metrics
from aube.proxy.pool import Pool
from aube.proxy.relay import ClientSide, UpstreamSide
from aube.proxy.reserve import Reserve
from aube.proxy.waiting import Waiter, WaitingClients
from aube.shared import addresses, bus, names
from aube.shared import instance_lifecycle as lifecycle
from aube.shared.errors import AubeError, CapacityExhausted
from aube.shared.registry import InstanceEntry, Registry
from aube.shared.schemas import FunctionRecord, ScaleReply, ScaleRequest
from aube.shared.settings import ProxySettings

log = logging.getLogger(__name__)

# A scale reply comes once every new instance is healthy, which for dozens of instances on a small machine takes
# many seconds. The request runs beside the waiting clients (they claim each instance as it turns free), so a
# slow reply is not a failure; only a silent control plane is.
SCALE_TIMEOUT = 120.0
# How long an instance may take to answer a client's head. Its server answers at once, unless the last stream's
# cleanup still runs there (a command being stopped), which it waits for; an instance silent for longer is broken.
ANSWER_TIMEOUT = 15.0
UNREACHABLE_RETRY = 0.25  # a claim that met an unreachable registry is tried again this soon


class Refusal(msgspec.Struct, frozen=True, kw_only=True):
    """Why a client gets no instance: the plain HTTP answer the gateway sends it."""

    error: handshake.HeadError
    retry_after: float | None = None


async def _wait_any(*events: asyncio.Event) -> None:
    async with anyio.create_task_group() as tg:

        async def one(event: asyncio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(one, event)


class Claimer:
    def __init__(
        self,
        settings: ProxySettings,
        nc: NATS,
        registry: Registry,
        pool: Pool,
        metrics: Metrics,
        holdings: Holdings,
        reserve: Reserve,
        tcp_options: list[sockopts.Option],
        tg: TaskGroup,
    ) -> None:
        self.settings = settings
        self.proxy_id = settings.proxy_id
        self.nc = nc
        self.registry = registry
        self.pool = pool
        self.metrics = metrics
        self.holdings = holdings
        self.reserve = reserve  # instances this replica holds for its next clients (reserved, or kept after a stream)
        self.tg = tg  # scale asks and busy instances' releases run beside the clients
        self.waiting = WaitingClients()  # clients waiting for an instance, per function, in arrival order
        self._scale_quiet_until: dict[str, float] = {}  # per function, monotonic: a recent ask (ours or not)
        self.tcp_options = tcp_options  # keepalive and user timeout for the instance leg
        self.pool.listeners.append(self.dispatch)

    async def claim_and_connect(
        self, client: ClientSide, name: str, raw_head: bytes
    ) -> tuple[InstanceEntry, UpstreamSide | handoff.HandedOff] | Refusal | None:
        """Claim a free instance, connect to it and hand it the client's head, waiting up to the claim timeout (and,
        while instances of the function are starting, up to the claim timeout's ceiling: `_wait_for_starts`).

        None when the client left meanwhile. The first client finding no one waiting tries every free instance; a
        client that must wait joins the function's queue (waiting.py) and tries only the instance offered to it,
        first come, first served. An instance that answers "busy" or cannot be reached is set aside and the next
        one is tried: the client never sees an instance's own 503."""
        started = anyio.current_time()
        failed: set[str] = set()
        unreachable = False
        with contextlib.ExitStack() as in_line:
            waiter: Waiter | None = None
            try:
                with anyio.CancelScope(deadline=started + self.settings.claim_timeout) as waiting:
                    while not client.gone:
                        fn = self.pool.function(name)
                        if fn is None:
                            msg = f"unknown function {name!r}"
                            error = handshake.HeadError(status=404, reason="unknown_function", message=msg)
                            return Refusal(error=error)
                        try:
                            slot, waiter = await self._next_claim(fn, waiter, failed, in_line)
                            unreachable = False
                        except RegistryUnreachable as e:
                            # NATS is away, or a cluster is electing a new leader for the registry (seconds): the
                            # client waits and tries again within its claim timeout, and is answered 503 with
                            # Retry-After only if the registry is still unreachable then (reliability finding 4: it
                            # used to be closed unanswered).
                            log.warning("claim for %s failed, the registry is unreachable: %s", name, e)
                            self.metrics.claims_total[(name, "registry_unreachable")] += 1
                            unreachable = True
                            await anyio.sleep(UNREACHABLE_RETRY)
                            continue
                        self.maybe_scale(fn)
                        if slot is not None:
                            upstream = await self._open(client, slot, raw_head)
                            if upstream is not None:
                                self.metrics.observe_claim_latency(anyio.current_time() - started)
                                return slot, upstream
                            failed.add(slot.key)
                            continue
                        if waiter is not None and waiter.offer is None:
                            self._wait_for_starts(fn, waiting, started)
                            # Wake on an offer, the client leaving, or the end of a scale cooldown (to ask again if
                            # the last ask was lost); this is no polling: nothing is read until a wake-up.
                            with anyio.move_on_after(max(self.settings.scale_cooldown, 0.1)):
                                await _wait_any(waiter.offered, client.ended)
            finally:
                in_line.close()  # leave the queue first: an instance offered to this client goes to the next one
                self.dispatch(name)
        if unreachable:
            message = "the platform's registry is unreachable; retry shortly"
            error = handshake.HeadError(status=503, reason="registry_unreachable", message=message)
            return Refusal(error=error, retry_after=2.0)
        if client.gone:
            self.metrics.claims_total[(name, "client_gone")] += 1
            return None
        self.metrics.claims_total[(name, "timeout")] += 1
        retry = max(1.0, self.settings.scale_cooldown)
        message = f"no instance of {name!r} available within {anyio.current_time() - started:.0f}s"
        return Refusal(error=handshake.HeadError(status=503, reason="no_instance", message=message), retry_after=retry)

    async def _next_claim(
        self, fn: FunctionRecord, waiter: Waiter | None, failed: set[str], in_line: contextlib.ExitStack
    ) -> tuple[InstanceEntry | None, Waiter | None]:
        """One claim attempt: an instance this replica kept after a stream (no registry write), else any free one
        while nobody waits; else, in line, only the one offered to us (or one kept, when we are woken for it)."""
        if waiter is not None or not self.waiting.queued(fn.name):
            kept = self.reserve.take(fn.name)
            if kept is not None:
                self.metrics.claims_total[(fn.name, "reserved")] += 1
                return kept, waiter
        if waiter is None and not self.waiting.queued(fn.name):
            slot = await self._claim(fn, self._candidates(fn, failed))
            if slot is not None:
                return slot, None
        if waiter is None:
            waiter = in_line.enter_context(self.waiting.join(fn.name))
        self.dispatch(fn.name)
        offer = waiter.take()
        if offer is None:
            return None, waiter
        try:
            return await self._claim(fn, [offer] if lifecycle.claimable(fn, offer.record) else []), waiter
        finally:
            self.waiting.tried(waiter)
            self.dispatch(fn.name)

    def _wait_for_starts(self, fn: FunctionRecord, waiting: anyio.CancelScope, started: float) -> None:
        """The adaptive claim timeout: while the view shows instances of `fn` starting (a scale-out, this replica's or
        another's, or the keeper's), a waiting client keeps waiting for them, `claim_timeout` past now at least, up
        to `claim_timeout_max` after it arrived. Parallel Docker starts take longer than a fixed 10 s: a burst of 12
        clients got four 503s while the instances it had asked for were still starting."""
        if decisions.counts(fn, self.pool.entries_of(fn.name)).starting == 0:
            return
        ceiling = started + max(self.settings.claim_timeout_max, self.settings.claim_timeout)
        waiting.deadline = max(waiting.deadline, min(anyio.current_time() + self.settings.claim_timeout, ceiling))

    def _candidates(self, fn: FunctionRecord, failed: set[str]) -> list[InstanceEntry]:
        skip = frozenset(failed | self.holdings.held.keys())
        return decisions.candidates(fn, self.pool.entries_of(fn.name), salt=uuid.uuid4().hex, skip=skip)

    def dispatch(self, name: str | None = None) -> None:
        """Offer the free instances of the view to waiting clients (of every function with a queue when None)."""
        for function in [name] if name is not None else self.waiting.functions():
            fn = self.pool.function(function)
            if fn is not None and self.waiting.queued(function):
                self.waiting.dispatch(function, self._candidates(fn, set()))

    async def _claim(self, fn: FunctionRecord, candidates: list[InstanceEntry]) -> InstanceEntry | None:
        for cand in candidates:
            entry = await self.holdings.claim(cand)
            if entry is None:
                self.metrics.claims_total[(fn.name, "lost_race")] += 1
                continue
            self.metrics.claims_total[(fn.name, "claimed")] += 1
            log.debug("claimed %s (%s) at revision %d", cand.key, entry.record.instance_id, entry.revision)
            return entry
        return None

    async def _open(
        self, client: ClientSide, slot: InstanceEntry, raw_head: bytes
    ) -> UpstreamSide | handoff.HandedOff | None:
        """Connect to the claimed instance, send it the client's head and read its answer (or hand it the client's
        socket, `_hand_off`). None when it cannot serve (unreachable, no answer, busy): the claim is dealt with here
        and the caller tries another instance."""
        if self.settings.handoff == "auto":
            path = handoff.handoff_socket(slot.record.handoff or addresses.handoff_path(slot.record.address))
            if path is not None:
                outcome = await self._hand_off(client, slot, raw_head, path)
                if outcome != "unavailable":
                    return outcome
        upstream = await self._connect(client, slot)
        if upstream is None:
            return None
        rec = slot.record
        try:
            upstream.transport.write(handshake.forward_head(raw_head, client.client_ip, rec.secret))
            with anyio.move_on_after(ANSWER_TIMEOUT):
                await upstream.head_done.wait()
        except BaseException:
            # Cancelled (claim timeout, client gone, shutdown) before the answer: the instance may have taken the
            # stream, so it returns to the pool only once it says its handler is done.
            upstream.transport.abort()
            with anyio.CancelScope(shield=True):
                await self.holdings.release_when_done(slot)
            raise
        answer = handshake.instance_answer(bytes(upstream.head)) if upstream.head_done.is_set() else "broken"
        if answer in ("upgraded", "refused"):
            return upstream
        upstream.transport.abort()
        if answer == "busy":
            # Free in the registry, busy in fact (a stream this replica did not send there): set aside until it says
            # its handler is done (then back to the pool), else recycled; the client goes on meanwhile.
            log.warning("instance %s (%s) answered busy; trying another", slot.key, rec.instance_id)
            self.metrics.claims_total[(rec.function, "instance_busy")] += 1
            self.tg.start_soon(self.holdings.release_when_done, slot)
            return None
        log.warning("instance %s (%s) gave no valid answer to the head; trying another", slot.key, rec.instance_id)
        self.metrics.claims_total[(rec.function, "unreachable")] += 1
        await self.holdings.mark_unhealthy(slot, "no answer to a request head")
        return None

    async def _hand_off(
        self, client: ClientSide, slot: InstanceEntry, raw_head: bytes, path: str
    ) -> handoff.HandedOff | Literal["unavailable"] | None:
        rec = slot.record
        fn = self.pool.functions.get(rec.function)
        head = handshake.forward_head(raw_head, client.client_ip, rec.secret)
        # The instance waits this long for the end's acknowledgement: what `release_when_done` may take, and more.
        ack_wait = self.settings.handler_grace + 2 * REQUEST_TIMEOUT + 5.0
        try:
            outcome = await handoff.offer(
                client,
                path,
                head,
                len(raw_head),
                rec.secret,
                decisions.stream_limits(fn),
                ack_wait,
                ANSWER_TIMEOUT,
                ping_bound=decisions.ping_bound(fn, rec),
            )
        except BaseException:
            # Cancelled (claim timeout, shutdown) while offering: the instance may have taken the client, so nothing
            # more may be written to it from here (not even a 503): let go of it.
            client.abort()
            with anyio.CancelScope(shield=True):
                await self.holdings.release_when_done(slot)
            raise
        if isinstance(outcome, handoff.HandedOff) or outcome == "unavailable":
            return outcome
        if outcome == "busy":
            log.warning("instance %s (%s) refused a handoff as busy; trying another", slot.key, rec.instance_id)
            self.metrics.claims_total[(rec.function, "instance_busy")] += 1
        # "lost": the client was let go; the instance comes back once it says its handler is done.
        self.tg.start_soon(self.holdings.release_when_done, slot)
        return None

    async def _connect(self, client: ClientSide, slot: InstanceEntry) -> UpstreamSide | None:
        rec = slot.record
        try:
            with anyio.fail_after(self.settings.connect_timeout):
                transport, upstream = await addresses.create_connection(lambda: UpstreamSide(client), rec.address)
            sockopts.apply(transport.get_extra_info("socket"), self.tcp_options)  # a Unix socket is left alone
        except (OSError, ValueError, TimeoutError) as e:
            log.warning("instance %s (%s) at %s unreachable: %s", slot.key, rec.instance_id, rec.address, e)
            self.metrics.claims_total[(rec.function, "unreachable")] += 1
            await self.holdings.mark_unhealthy(slot)
            return None
        except BaseException:
            # Cancelled (claim timeout or shutdown) while connecting: the claim must not stay busy forever.
            with anyio.move_on_after(REQUEST_TIMEOUT, shield=True):
                await self.holdings.release(slot, used=False)
            raise
        return upstream

    # -- warm pool -----------------------------------------------------------------------------------------

    def maybe_scale(self, fn: FunctionRecord) -> None:
        # Our own fresh claims may not be in the view yet (the watch lags): count them as the busy ones they are.
        held = self.holdings.held
        entries = [held.get(e.key, e) for e in self.pool.entries_of(fn.name)]
        pool = decisions.counts(fn, entries)
        pool = msgspec.structs.replace(pool, free=pool.free + self.reserve.count(fn.name))  # kept ones serve too
        count = decisions.scale_count(fn, pool, self.waiting.count(fn.name))
        if count <= 0:
            return
        now = anyio.current_time()
        if self._scale_quiet_until.get(fn.name, 0.0) > now:
            return
        self._scale_quiet_until[fn.name] = now + self.settings.scale_cooldown
        self.tg.start_soon(self._scale, fn.name, count)

    async def _scale(self, name: str, count: int) -> None:
        try:
            intent = decisions.scale_intent(name, self.proxy_id, time.time(), self.settings.scale_cooldown)
            if not await self.registry.take_scale_intent(intent):
                log.debug("scale of %s already asked for by another replica", name)
                return
            self.metrics.scale_requests_total[name] += 1
            body = ScaleRequest(name=name, count=count, requested_by=self.proxy_id)
            reply = await bus.request(self.nc, names.SUBJECT_SCALE, body, ScaleReply, SCALE_TIMEOUT)
            log.info("scaled %s by %d: %d instances", name, len(reply.started), reply.total)
        except CapacityExhausted as e:
            log.debug("scale of %s refused: %s", name, e)  # waiting clients get a released instance or a 503
        except AubeError as e:
            log.warning("scale request for %s failed: %s", name, e)
        except Exception:
            log.exception("scale request for %s failed", name)
