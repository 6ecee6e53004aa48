"""One proxy replica, the WebSocket gateway: `serve()` connects to NATS, listens, and runs the replica's task tree.

Any number of replicas share one registry (and one port, by SO_REUSEPORT). The work is the parts', composed here:
`gateway` (connections, request heads, refusals, operator endpoints), `claiming` (the waiting line, claims, the
instance's answer to the head, scale asks), `holdings` (the instances this replica holds: releases, marking
unhealthy, settling unknown outcomes, stop requests) and `streams` (relay supervision until a stream ends).

Task tree (all children of `serve`'s task group): the lease renewal, the two registry watches, the settling of
unknown outcomes, the accept loops, one task per client connection, and short-lived scale and stop requests.
Cancelling `serve` ends every stream; each stream's `finally` releases its instance under a shielded, bounded
scope, and only after all of them is the lease deleted, so the reaper never sees a live claim without a lease.

Log levels: ERROR a bug, WARNING a dependency misbehaving (control plane silent, instance unreachable),
INFO lifecycle and the one canonical line per stream, DEBUG transitions and lost races.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from functools import partial

import anyio
from anyio.abc import TaskStatus

from aube.proxy import native_relay, sockopts
from aube.proxy.claiming import Claimer
from aube.proxy.dashboard import Dashboard
from aube.proxy.gateway import Gateway
from aube.proxy.holdings import Holdings
from aube.proxy.leases import LeaseClock, RenewSignal, keep_lease
from aube.proxy.metrics import Metrics
from aube.proxy.pool import Pool
from aube.proxy.reserve import Reserve
from aube.proxy.streams import Streams
from aube.shared import natsconn
from aube.shared.registry import Registry
from aube.shared.settings import ProxySettings

log = logging.getLogger(__name__)

REGISTRY_CALL_TIMEOUT = 2.0  # seconds a registry read or write may take before it counts as unanswered


async def serve(settings: ProxySettings, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
    """Run one proxy replica until cancelled; `task_status.started(port)` once listening and watching."""
    tcp_options = sockopts.plan(settings)  # an unusable socket option setting stops the start before anything runs
    use_native = settings.relay_engine == "native" or (settings.relay_engine == "auto" and native_relay.available())
    if settings.relay_engine == "native" and not native_relay.available():
        raise RuntimeError("AUBE_RELAY_ENGINE=native, but the native relay engine is not installed (scripts/setup.sh)")
    renew_now = RenewSignal()

    async def reconnected() -> None:
        renew_now.set()

    nc = await natsconn.connect(
        settings.nats_url,
        user=settings.nats_user,
        password=settings.nats_password,
        name=f"aube-proxy-{settings.proxy_id}",
        reconnected_cb=reconnected,
    )
    try:
        # Short JetStream timeouts: a claim that meets a registry leader change fails fast and is tried again within
        # the client's claim timeout (claiming.py), instead of waiting out nats-py's 5 s per call.
        registry = await Registry.open(nc.jetstream(timeout=REGISTRY_CALL_TIMEOUT), replicas=settings.kv_replicas)
        sock = _listen_socket(settings.proxy_host, settings.proxy_port, settings.reuse_port)
        with sock, contextlib.ExitStack() as stack:
            port = int(sock.getsockname()[1])
            operator_sock: socket.socket | None = None
            operator_port: int | None = None
            if settings.operator_port is not None:
                # No SO_REUSEPORT: each replica's metrics are its own, so each replica has its own port.
                operator_sock = stack.enter_context(
                    _listen_socket(settings.operator_host, settings.operator_port, reuse_port=False)
                )
                operator_port = int(operator_sock.getsockname()[1])
            try:
                async with anyio.create_task_group() as tg:
                    pool, metrics = Pool(registry), Metrics()
                    holdings = Holdings(settings, nc, registry, pool, tg)
                    lease_clock = LeaseClock(settings.lease_ttl)
                    reserve = Reserve(
                        settings.reserve_seconds,
                        pool,
                        holdings,
                        lease_fresh=lease_clock.fresh,
                        on_kept=lambda function: claimer.waiting.nudge(function),
                        ahead=settings.reserve,
                    )
                    claimer = Claimer(settings, nc, registry, pool, metrics, holdings, reserve, tcp_options, tg)
                    native = _native_relay_engine(settings) if use_native else None
                    if native is not None:
                        stack.callback(native.shutdown)  # after the task group: every stream has closed its legs
                        metrics.native_bytes = lambda: native.totals
                    streams = Streams(settings, pool, metrics, holdings, reserve, native)
                    dashboard = (
                        Dashboard(settings.proxy_id, pool, metrics, settings.operator_host)
                        if operator_sock is not None
                        else None
                    )
                    gateway = Gateway(settings, pool, metrics, claimer, streams, tcp_options, dashboard)
                    await tg.start(
                        partial(keep_lease, renew_now=renew_now, renewed=lease_clock.renewed),
                        registry,
                        settings.proxy_id,
                        settings.lease_ttl,
                        f":{port}",
                    )
                    await tg.start(pool.watch_instances)
                    tg.start_soon(holdings.unsettled.run, registry, holdings.held, holdings.settle)
                    tg.start_soon(reserve.run)
                    await tg.start(pool.watch_functions)
                    tg.start_soon(gateway.accept_loop, sock, tg)
                    if operator_sock is not None:
                        tg.start_soon(gateway.accept_loop, operator_sock, tg, True)
                    if dashboard is not None:
                        tg.start_soon(dashboard.run)
                    log.info(
                        "proxy %s listening on %s:%d (relay engine: %s)",
                        settings.proxy_id,
                        settings.proxy_host,
                        port,
                        "native" if native is not None else "python",
                    )
                    if operator_port is not None:
                        log.info(
                            "proxy %s serves /_aube/metrics and /_aube/dashboard on %s:%d",
                            settings.proxy_id,
                            settings.operator_host,
                            operator_port,
                        )
                    task_status.started(port)
            finally:
                log.info("proxy %s stopped", settings.proxy_id)
    finally:
        with anyio.move_on_after(5, shield=True):
            await nc.close()


def _native_relay_engine(settings: ProxySettings) -> native_relay.NativeRelay | None:
    """The native relay engine; with `auto`, None (the Python relay) when it cannot start here."""
    try:
        return native_relay.NativeRelay(asyncio.get_running_loop())
    except OSError as e:
        if settings.relay_engine == "native":
            raise
        log.warning("the native relay engine could not start (%s): relaying in Python", e)
        return None


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
