"""The WebSocket gateway: one `serve()` per replica; any number of replicas share one registry (and one port).

Per client: read the request head (bounded in size and time), answer `/_aube/health` and every
refusal with plain HTTP before any upgrade, claim a free instance by compare-and-set, connect to it, send it the
client's head unchanged (plus X-Forwarded-For) and then relay bytes both ways until either side ends. The
instance's own 101 answer reaches the client, so subprotocols and extensions are negotiated end to end.

Operator endpoints apart: `/_aube/metrics` names every function (protected ones too), so it is served only on the
operator listener (`operator_host:operator_port`, loopback by default, one port per replica), never on the public
port, where it is a 404. The operator listener serves `/_aube/health` and `/_aube/metrics` and nothing else.

Task tree (all children of `serve`'s task group): the lease renewal, the two registry watches, the accept
loop, one task per client connection, and short-lived scale and stop requests. Cancelling `serve` ends every
stream; each stream's `finally` releases its instance under a shielded, bounded scope, and only after all
of them is the lease deleted, so the reaper never sees a live claim without a lease.

Hung peers: both TCP legs get keepalive and `TCP_USER_TIMEOUT` (`aube.proxy.sockopts`), which end a stream whose
peer's host vanished. A peer whose process hangs while its kernel still answers is the ping policy's: with
`[limits] ping_interval` set, the instance's server pings the client (an unanswered ping ends the stream at the
instance, which the proxy sees as the instance closing), and since a live instance then sends at least one frame
every `ping_interval`, an instance that sent nothing for `ping_interval + ping_timeout` while the client leg could
take its bytes is hung: the stream ends (`close=instance_silent`) and the instance is marked unhealthy and stopped,
never handed to the next client. This costs no per-message work: the relay's byte counter is sampled.

Log levels: ERROR a bug, WARNING a dependency misbehaving (control plane silent, instance unreachable),
INFO lifecycle and the one canonical line per stream, DEBUG transitions and lost races.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import Callable
from functools import partial

import anyio
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.client import Client as NATS

from aube.proxy import claims, handshake, sockopts
from aube.proxy.leases import RenewSignal, keep_lease
from aube.proxy.metrics import Metrics, render
from aube.proxy.pool import Pool
from aube.proxy.relay import ClientSide, UpstreamSide
from aube.proxy.unsettled import Pending, Unsettled
from aube.proxy.waiting import Waiter, WaitingClients
from aube.shared import addresses, bus, instance_health, names, natsconn
from aube.shared import instance_lifecycle as lifecycle
from aube.shared.errors import AubeError, CapacityExhausted
from aube.shared.registry import REGISTRY_ERRORS, InstanceEntry, NotWritten, Registry, Unknown, Written
from aube.shared.schemas import (
    FunctionRecord,
    InstanceRecord,
    ScaleReply,
    ScaleRequest,
    StopInstanceReply,
    StopInstanceRequest,
)
from aube.shared.settings import ProxySettings

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0  # stop requests: the control plane replies once the instance is gone
# A scale reply comes once every new instance is healthy, which for dozens of instances on a small machine takes
# many seconds. The request runs beside the waiting clients (they claim each instance as it turns free), so a
# slow reply is not a failure; only a silent control plane is.
SCALE_TIMEOUT = 120.0
CLOSE_GRACE = 2.0  # how long a closed side may take to flush before it is aborted
# How long an instance may take to answer a client's head. Its server answers at once, unless the last stream's
# cleanup still runs there (a command being stopped), which it waits for; an instance silent for longer is broken.
ANSWER_TIMEOUT = 15.0


async def serve(settings: ProxySettings, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
    """Run one proxy replica until cancelled; `task_status.started(port)` once listening and watching."""
    sockopts.plan(settings)  # an unusable socket option setting stops the start before anything runs
    renew_now = RenewSignal()

    async def reconnected() -> None:
        renew_now.set()

    nc = await natsconn.connect(
        settings.nats_url,
        user=settings.nats_user,
        password=settings.nats_password,
        name=f"aube-proxy-{settings.proxy_id}",
        connect_timeout=5,
        reconnected_cb=reconnected,
    )
    try:
        registry = await Registry.open(nc.jetstream())
        sock = _listen_socket(settings.proxy_host, settings.proxy_port, settings.reuse_port)
        with sock, contextlib.ExitStack() as stack:
            port = int(sock.getsockname()[1])
            proxy = Proxy(settings, nc, registry)
            operator_sock: socket.socket | None = None
            if settings.operator_port is not None:
                # No SO_REUSEPORT: each replica's metrics are its own, so each replica has its own port.
                operator_sock = stack.enter_context(
                    _listen_socket(settings.operator_host, settings.operator_port, reuse_port=False)
                )
                proxy.operator_port = int(operator_sock.getsockname()[1])
            try:
                async with anyio.create_task_group() as tg:
                    await tg.start(
                        partial(keep_lease, renew_now=renew_now),
                        registry,
                        settings.proxy_id,
                        settings.lease_ttl,
                        f":{port}",
                    )
                    await tg.start(proxy.pool.watch_instances)
                    tg.start_soon(proxy.unsettled.run, registry, proxy.held, proxy.settle)
                    await tg.start(proxy.pool.watch_functions)
                    tg.start_soon(proxy.accept_loop, sock, tg)
                    if operator_sock is not None:
                        tg.start_soon(proxy.accept_loop, operator_sock, tg, True)
                    log.info("proxy %s listening on %s:%d", settings.proxy_id, settings.proxy_host, port)
                    if proxy.operator_port is not None:
                        log.info(
                            "proxy %s serves /_aube/metrics on %s:%d",
                            settings.proxy_id,
                            settings.operator_host,
                            proxy.operator_port,
                        )
                    task_status.started(port)
            finally:
                log.info("proxy %s stopped", settings.proxy_id)
    finally:
        with anyio.move_on_after(5, shield=True):
            await nc.close()


def _listen_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            # Several replicas on one port: the kernel spreads new connections across their listeners.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _wait_any(*events: asyncio.Event) -> None:
    async with anyio.create_task_group() as tg:

        async def one(event: asyncio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(one, event)


_NOT_FOUND = handshake.HeadError(status=404, reason="not_found", message="not found")


class RegistryUnreachable(Exception):
    """Internal: a claim could not be written (its outcome is unknown and settled later)."""


HANDLER_POLL = 0.05  # how often a proxy asks a finished stream's instance whether its handler has returned


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


class _Rejected(Exception):
    """Internal: the client was answered before any upgrade."""


class Proxy:
    def __init__(self, settings: ProxySettings, nc: NATS, registry: Registry) -> None:
        self.settings = settings
        self.proxy_id = settings.proxy_id
        self.nc = nc
        self.registry = registry
        self.pool = Pool(registry)
        self.pool.listeners.append(self._dispatch)
        self.metrics = Metrics()
        self.held: dict[str, InstanceEntry] = {}  # instances this replica has claimed, by key
        self.unsettled = Unsettled()  # claims and releases whose write timed out: settled when NATS answers
        self.waiting = WaitingClients()  # clients waiting for an instance, per function, in arrival order
        self._scale_quiet_until: dict[str, float] = {}  # per function, monotonic: a recent ask (ours or not)
        self._tg: TaskGroup | None = None
        self.operator_port: int | None = None  # the operator listener's port, once bound
        self.tcp_options = sockopts.plan(settings)  # keepalive and user timeout for both TCP legs

    # -- connections ---------------------------------------------------------------------------------------

    async def accept_loop(self, sock: socket.socket, tg: TaskGroup, operator: bool = False) -> None:
        """Accept clients on `sock`; `operator` marks the operator listener (metrics and health only)."""
        self._tg = tg
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as e:  # EMFILE and friends: keep the listener, let connections drain
                log.warning("accept failed: %s", e)
                await anyio.sleep(0.1)
                continue
            tg.start_soon(self._connection, conn, operator)

    async def _connection(self, conn: socket.socket, operator: bool = False) -> None:
        loop = asyncio.get_running_loop()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sockopts.apply(conn, self.tcp_options)
        max_buffer = self.settings.max_head_bytes
        try:
            _, client = await loop.connect_accepted_socket(lambda: ClientSide(self.metrics, max_buffer), conn)
        except OSError:
            conn.close()
            return
        try:
            await self._client(client, operator)
        except _Rejected:
            pass
        except Exception:  # a bug in one connection must not end the others
            log.exception("connection from %s failed", client.client_ip)
        finally:
            if client.transport is not None:
                client.transport.close()
                if not client.lost.is_set():
                    with anyio.move_on_after(CLOSE_GRACE, shield=True):
                        await client.lost.wait()
                if not client.lost.is_set():
                    client.abort()

    def _reject(self, client: ClientSide, error: handshake.HeadError, *, retry_after: float | None = None) -> None:
        self.metrics.handshakes_rejected_total[error.reason] += 1
        client.answer(handshake.error_response(error, retry_after=retry_after))
        raise _Rejected

    async def _read_head(self, client: ClientSide) -> int | None:
        """Wait for the complete head; the index where it ends, or None when the client went away."""
        with anyio.move_on_after(self.settings.head_timeout):
            while True:
                end = handshake.head_end(client.buffer, self.settings.max_head_bytes)
                if isinstance(end, handshake.HeadError):
                    self._reject(client, end)
                if isinstance(end, int):
                    return end
                if client.eof or client.lost.is_set():
                    return None
                await client.wait_data()
        self._reject(client, handshake.HeadError(status=408, reason="head_timeout", message="request head too slow"))
        return None  # pragma: no cover - _reject raises

    async def _client(self, client: ClientSide, operator: bool = False) -> None:
        end = await self._read_head(client)
        if end is None:
            return
        raw_head = bytes(client.buffer[:end])
        head = handshake.parse_head(raw_head)
        if isinstance(head, handshake.HeadError):
            self._reject(client, head)
        assert isinstance(head, handshake.RequestHead)
        target = handshake.route(head)
        if operator and not isinstance(target, handshake.Endpoint):
            self._reject(client, _NOT_FOUND)
        if isinstance(target, handshake.HeadError):
            self._reject(client, target)
        if isinstance(target, handshake.Endpoint) and target.which == "metrics" and not operator:
            self._reject(client, _NOT_FOUND)
        if isinstance(target, handshake.Endpoint):
            body = "ok\n" if target.which == "health" else render(self.metrics)
            ctype = "text/plain; charset=utf-8" if target.which == "health" else "text/plain; version=0.0.4"
            client.answer(handshake.response(200, body, content_type=ctype, head_only=head.method == "HEAD"))
            return
        assert isinstance(target, handshake.FunctionTarget)
        fn = self.pool.function(target.name)
        if fn is None:
            msg = f"unknown function {target.name!r}"
            self._reject(client, handshake.HeadError(status=404, reason="unknown_function", message=msg))
        assert fn is not None
        denied = handshake.authorize(head, fn.manifest.access.tokens_sha256)
        if denied is not None:
            self._reject(client, denied)
        await self._stream(client, target.name, raw_head, end)

    # -- one stream ----------------------------------------------------------------------------------------

    async def _stream(self, client: ClientSide, name: str, raw_head: bytes, head_len: int) -> None:
        started = anyio.current_time()
        got = await self._claim_and_connect(client, name, raw_head)
        if got is None:
            return
        slot, upstream = got
        self.metrics.observe_claim_latency(anyio.current_time() - started)
        rec = slot.record
        fn = self.pool.functions.get(name)
        limits = fn.manifest.limits if fn is not None else None
        reason = "shutdown"
        relay_started = anyio.current_time()
        self.metrics.streams_open[name] += 1
        try:
            # The instance accepted the head (or refused it itself): its answer goes to the client, then whatever the
            # client sent after its head. No await between these lines: bytes must follow each other in order.
            upstream.start_relay()
            upstream.transport.write(bytes(client.buffer[head_len:]))
            client.buffer.clear()
            client.attach(upstream)
            if client.ended.is_set():
                upstream.transport.close()
            idle = limits.stream_idle_timeout if limits and limits.stream_idle_timeout > 0 else None
            longest = limits.stream_max_duration if limits and limits.stream_max_duration > 0 else None
            # Only an instance started under this manifest pings; an older version's may be silent by right.
            pings = limits is not None and limits.ping_interval > 0 and fn is not None and fn.version == rec.version
            silent = limits.ping_interval + limits.ping_timeout if pings and limits else None
            reason = await self._relay(client, upstream, idle, longest, silent)
        finally:
            self.metrics.streams_open[name] -= 1
            bound = CLOSE_GRACE + self.settings.handler_grace + 2 * REQUEST_TIMEOUT + 1
            with anyio.move_on_after(bound, shield=True):
                if not upstream.lost.is_set():
                    upstream.transport.close()
                    with anyio.move_on_after(CLOSE_GRACE):
                        await upstream.lost.wait()
                    if not upstream.lost.is_set():
                        upstream.transport.abort()
                if client.transport is not None:
                    client.transport.close()
                if reason == "instance_silent":
                    await self._mark_unhealthy(slot, "hung")
                else:
                    await self._release_when_done(slot)
            log.info(
                "stream function=%s instance=%s slot=%d client=%s duration=%.3f bytes_in=%d bytes_out=%d close=%s",
                name,
                rec.instance_id,
                rec.slot,
                client.client_ip,
                anyio.current_time() - relay_started,
                client.bytes_in,
                upstream.bytes_out,
                reason,
            )

    async def _relay(
        self,
        client: ClientSide,
        upstream: UpstreamSide,
        idle: float | None,
        longest: float | None,
        silent: float | None = None,
    ) -> str:
        """Wait for the stream to end; why it ended. Bytes move in the protocols, not here.

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
                    await client.ended.wait()
                if upstream.lost.is_set() or upstream.eof_from_instance:
                    return "instance_closed"
                if client.lost.is_set() or client.eof:
                    return "client_closed"
                now = anyio.current_time()
                if idle:
                    total = client.bytes_in + upstream.bytes_out
                    if total != last_total:
                        last_total, last_change = total, now
                    elif now - last_change >= idle:
                        return "idle_timeout"
                if silent:
                    # While the client leg is full the proxy stops reading the instance: its silence is then ours.
                    if upstream.bytes_out != last_out or client.writing_paused:
                        last_out, last_out_change = upstream.bytes_out, now
                    elif now - last_out_change >= silent:
                        log.warning("instance sent nothing for %.1fs though it pings: hung", now - last_out_change)
                        return "instance_silent"
        return "max_duration"

    async def _claim_and_connect(
        self, client: ClientSide, name: str, raw_head: bytes
    ) -> tuple[InstanceEntry, UpstreamSide] | None:
        """Claim a free instance, connect to it and hand it the client's head, waiting up to the claim timeout.

        The first client finding no one waiting tries every free instance; a client that must wait joins the
        function's queue (waiting.py) and tries only the instance offered to it, first come, first served. An
        instance that answers "busy" or cannot be reached is set aside and the next one is tried: the client never
        sees an instance's own 503."""
        failed: set[str] = set()
        unreachable = False
        with contextlib.ExitStack() as in_line:
            waiter: Waiter | None = None
            try:
                with anyio.move_on_after(self.settings.claim_timeout):
                    while not client.ended.is_set():
                        fn = self.pool.function(name)
                        if fn is None:
                            msg = f"unknown function {name!r}"
                            self._reject(
                                client, handshake.HeadError(status=404, reason="unknown_function", message=msg)
                            )
                        assert fn is not None
                        try:
                            slot, waiter = await self._next_claim(fn, waiter, failed, in_line)
                        except RegistryUnreachable as e:
                            # NATS is away (reliability finding 4: the client's connection was closed unanswered).
                            log.warning("claim for %s failed, the registry is unreachable: %s", name, e)
                            self.metrics.claims_total[(name, "registry_unreachable")] += 1
                            unreachable = True
                            break
                        self._maybe_scale(fn)
                        if slot is not None:
                            upstream = await self._open(client, slot, raw_head)
                            if upstream is not None:
                                return slot, upstream
                            failed.add(slot.key)
                            continue
                        if waiter is not None and waiter.offer is None:
                            # Wake on an offer, the client leaving, or the end of a scale cooldown (to ask again if
                            # the last ask was lost); this is no polling: nothing is read until a wake-up.
                            with anyio.move_on_after(max(self.settings.scale_cooldown, 0.1)):
                                await _wait_any(waiter.offered, client.ended)
            finally:
                in_line.close()  # leave the queue first: an instance offered to this client goes to the next one
                self._dispatch(name)
        if unreachable:
            message = "the platform's registry is unreachable; retry shortly"
            self._reject(
                client, handshake.HeadError(status=503, reason="registry_unreachable", message=message), retry_after=2.0
            )
        if client.ended.is_set():
            self.metrics.claims_total[(name, "client_gone")] += 1
            return None
        self.metrics.claims_total[(name, "timeout")] += 1
        retry = max(1.0, self.settings.scale_cooldown)
        message = f"no instance of {name!r} available within {self.settings.claim_timeout:g}s"
        self._reject(client, handshake.HeadError(status=503, reason="no_instance", message=message), retry_after=retry)
        return None  # pragma: no cover - _reject raises

    async def _next_claim(
        self, fn: FunctionRecord, waiter: Waiter | None, failed: set[str], in_line: contextlib.ExitStack
    ) -> tuple[InstanceEntry | None, Waiter | None]:
        """One claim attempt: any free instance while nobody waits; else, in line, only the one offered to us."""
        if waiter is None and not self.waiting.queued(fn.name):
            slot = await self._claim(fn, self._candidates(fn, failed))
            if slot is not None:
                return slot, None
        if waiter is None:
            waiter = in_line.enter_context(self.waiting.join(fn.name))
        self._dispatch(fn.name)
        offer = waiter.take()
        if offer is None:
            return None, waiter
        try:
            return await self._claim(fn, [offer] if lifecycle.claimable(fn, offer.record) else []), waiter
        finally:
            self.waiting.tried(waiter)
            self._dispatch(fn.name)

    def _candidates(self, fn: FunctionRecord, failed: set[str]) -> list[InstanceEntry]:
        skip = frozenset(failed | self.held.keys())
        return claims.candidates(fn, self.pool.entries_of(fn.name), salt=uuid.uuid4().hex, skip=skip)

    def _dispatch(self, name: str | None = None) -> None:
        """Offer the free instances of the view to waiting clients (of every function with a queue when None)."""
        for function in [name] if name is not None else self.waiting.functions():
            fn = self.pool.function(function)
            if fn is not None and self.waiting.queued(function):
                self.waiting.dispatch(function, self._candidates(fn, set()))

    async def _claim(self, fn: FunctionRecord, candidates: list[InstanceEntry]) -> InstanceEntry | None:
        for cand in candidates:
            claim = partial(
                lifecycle.claim, proxy_id=self.proxy_id, now=time.time(), instance_id=cand.record.instance_id
            )
            # Shielded: a claim written but not recorded here (cancelled awaiting the reply) would stay busy.
            with anyio.CancelScope(shield=True):
                try:
                    # One write: a lost race is better spent on the next candidate than on re-reading this one.
                    outcome = await self.registry.apply(cand.key, claim, entry=cand, attempts=1)
                except REGISTRY_ERRORS as e:  # nothing was written (apply raises only before its write)
                    raise RegistryUnreachable(str(e)) from e
            if isinstance(outcome, Unknown):
                # The write may still land: never guessed, settled once the registry answers (unsettled.py).
                self.unsettled.add(cand.key, outcome.record, used=False)
                raise RegistryUnreachable(outcome.error)
            if isinstance(outcome, NotWritten):
                self.metrics.claims_total[(fn.name, "lost_race")] += 1
                continue
            entry = outcome.entry
            self.held[cand.key] = entry
            self.metrics.claims_total[(fn.name, "claimed")] += 1
            log.debug("claimed %s (%s) at revision %d", cand.key, entry.record.instance_id, entry.revision)
            return entry
        return None

    async def _open(self, client: ClientSide, slot: InstanceEntry, raw_head: bytes) -> UpstreamSide | None:
        """Connect to the claimed instance, send it the client's head and read its answer. None when it cannot serve
        (unreachable, no answer, busy): the claim is dealt with here and the caller tries another instance."""
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
                await self._release_when_done(slot)
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
            if self._tg is not None:
                self._tg.start_soon(self._release_when_done, slot)
            return None
        log.warning("instance %s (%s) gave no valid answer to the head; trying another", slot.key, rec.instance_id)
        self.metrics.claims_total[(rec.function, "unreachable")] += 1
        await self._mark_unhealthy(slot, "no answer to a request head")
        return None

    async def _release_when_done(self, slot: InstanceEntry) -> None:
        """Free means free (reliability finding 5): the instance goes back to the pool only once it says its
        stream's handler has returned; one still busy after the grace (or silent) is never handed out again."""
        if await instance_done(slot.record, self.settings.handler_grace):
            await self._release(slot, used=True)
        else:
            await self._mark_unhealthy(slot, "handler still running after its stream")

    async def _connect(self, client: ClientSide, slot: InstanceEntry) -> UpstreamSide | None:
        rec = slot.record
        try:
            with anyio.fail_after(self.settings.connect_timeout):
                transport, upstream = await addresses.create_connection(lambda: UpstreamSide(client), rec.address)
            sockopts.apply(transport.get_extra_info("socket"), self.tcp_options)  # a Unix socket is left alone
        except (OSError, ValueError, TimeoutError) as e:
            log.warning("instance %s (%s) at %s unreachable: %s", slot.key, rec.instance_id, rec.address, e)
            self.metrics.claims_total[(rec.function, "unreachable")] += 1
            await self._mark_unhealthy(slot)
            return None
        except BaseException:
            # Cancelled (claim timeout or shutdown) while connecting: the claim must not stay busy forever.
            with anyio.move_on_after(REQUEST_TIMEOUT, shield=True):
                await self._release(slot, used=False)
            raise
        return upstream

    # -- registry transitions ------------------------------------------------------------------------------

    async def _release(self, slot: InstanceEntry, *, used: bool) -> None:
        """busy -> free, or -> draining (and ask the control plane to stop it) when it must not serve again.

        A registry that does not answer leaves the outcome unknown: the claim is settled once it answers again."""
        claim = slot.record

        def release(rec: InstanceRecord) -> InstanceRecord:
            if not lifecycle.holds(rec, claim):
                raise lifecycle.Refused("release", rec, "it no longer shows this replica's claim")
            fn = self.pool.functions.get(rec.function)
            return lifecycle.release(rec, fn, time.time(), by=self.proxy_id, used=used)

        try:
            outcome = await self._apply(slot, release)
            if isinstance(outcome, Unknown):
                log.warning("release of %s failed (%s); settled once the registry answers", slot.key, outcome.error)
                self.unsettled.add(slot.key, claim, used=used)
            elif isinstance(outcome, NotWritten):
                log.debug("%s not released (%s): nothing to do", slot.key, outcome.why)
            elif outcome.entry.record.state == "draining":
                rec = outcome.entry.record
                log.debug("released %s -> draining", slot.key)
                await self._stop(rec, "retired" if rec.retire else "fresh_per_stream")
            else:
                log.debug("released %s -> free", slot.key)
        finally:
            self.held.pop(slot.key, None)

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
            await self._mark_unhealthy(slot, "unreachable (settled after a registry outage)")
        else:
            await self._release(slot, used=pending.used)

    async def _mark_unhealthy(self, slot: InstanceEntry, reason: str = "unreachable") -> None:
        claim = slot.record

        def unhealthy(rec: InstanceRecord) -> InstanceRecord:
            if not lifecycle.holds(rec, claim):
                raise lifecycle.Refused("mark_unhealthy", rec, "it no longer shows this replica's claim")
            return lifecycle.mark_unhealthy(rec, by=self.proxy_id)

        try:
            outcome = await self._apply(slot, unhealthy)
        finally:
            self.held.pop(slot.key, None)
        if isinstance(outcome, Unknown):
            self.unsettled.add(slot.key, claim, used=True, then="unhealthy")
            return
        if not isinstance(outcome, Written):
            return
        # The client goes on to another instance meanwhile; the stop request runs beside it.
        if self._tg is not None:
            self._tg.start_soon(self._stop, outcome.entry.record, reason)

    async def _stop(self, rec: InstanceRecord, reason: str) -> None:
        body = StopInstanceRequest(name=rec.function, slot=rec.slot, instance_id=rec.instance_id, reason=reason)
        try:
            await bus.request(self.nc, names.SUBJECT_STOP_INSTANCE, body, StopInstanceReply, REQUEST_TIMEOUT)
        except AubeError as e:
            log.warning("stop request for %s.%d (%s) failed: %s", rec.function, rec.slot, rec.instance_id, e)

    # -- warm pool -----------------------------------------------------------------------------------------

    def _maybe_scale(self, fn: FunctionRecord) -> None:
        # Our own fresh claims may not be in the view yet (the watch lags): count them as the busy ones they are.
        entries = [self.held.get(e.key, e) for e in self.pool.entries_of(fn.name)]
        count = claims.scale_count(fn, claims.counts(fn, entries), self.waiting.count(fn.name))
        if count <= 0 or self._tg is None:
            return
        now = anyio.current_time()
        if self._scale_quiet_until.get(fn.name, 0.0) > now:
            return
        self._scale_quiet_until[fn.name] = now + self.settings.scale_cooldown
        self._tg.start_soon(self._scale, fn.name, count)

    async def _scale(self, name: str, count: int) -> None:
        try:
            intent = claims.scale_intent(name, self.proxy_id, time.time(), self.settings.scale_cooldown)
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
