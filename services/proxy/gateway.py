"""Head I/O: accepting connections, reading each client's request head, routing it, refusing it, or handing it on.

Per client: read the request head (bounded in size and time), answer `/_aube/health` and every refusal with plain
HTTP before any upgrade, then have the claimer get an instance that takes the head (claiming.py) and the streams
carry it until either side ends (streams.py). The decisions on the head are the pure `aube.proxy.handshake`'s.

Operator endpoints apart: `/_aube/metrics` and the dashboard (`/_aube/dashboard` and what is under it, dashboard.py)
name every function (protected ones too), so they are served only on the operator listener
(`operator_host:operator_port`, loopback by default, one port per replica), never on the public port, where they are
a 404. The operator listener serves `/_aube/health`, `/_aube/metrics` and the dashboard and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import anyio
from anyio.abc import TaskGroup

from aube.proxy import handshake, sockopts
from aube.proxy.claiming import Claimer, Refusal
from aube.proxy.dashboard import Dashboard
from aube.proxy.handoff import HandedOff
from aube.proxy.metrics import Metrics, render
from aube.proxy.pool import Pool
from aube.proxy.relay import ClientSide
from aube.proxy.streams import CLOSE_GRACE, Streams
from aube.shared.operator_http import host_allowed
from aube.shared.settings import ProxySettings

log = logging.getLogger(__name__)

_NOT_FOUND = handshake.HeadError(status=404, reason="not_found", message="not found")


class _Rejected(Exception):
    """Internal: the client was answered before any upgrade."""


class Gateway:
    def __init__(
        self,
        settings: ProxySettings,
        pool: Pool,
        metrics: Metrics,
        claimer: Claimer,
        streams: Streams,
        tcp_options: list[sockopts.Option],
        dashboard: Dashboard | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.metrics = metrics
        self.claimer = claimer
        self.streams = streams
        self.tcp_options = tcp_options  # keepalive and user timeout for the client leg
        self.dashboard = dashboard  # None: no operator listener, nothing to show

    async def accept_loop(self, sock: socket.socket, tg: TaskGroup, operator: bool = False) -> None:
        """Accept clients on `sock`; `operator` marks the operator listener (metrics, dashboard and health only)."""
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
        if isinstance(target, handshake.Endpoint) and target.which != "health" and not operator:
            self._reject(client, _NOT_FOUND)
        if isinstance(target, handshake.Endpoint) and target.which == "dashboard":
            page = self.dashboard.answer(head) if self.dashboard is not None else None
            if page is None:
                self._reject(client, _NOT_FOUND)
            assert page is not None
            client.answer(page)
            return
        if (
            isinstance(target, handshake.Endpoint)
            and target.which == "metrics"
            and not host_allowed(head.header("host"), self.settings.operator_host)
        ):
            message = "metrics answer only by address, localhost or the operator host's name"
            self._reject(client, handshake.HeadError(status=403, reason="foreign_host", message=message))
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
        client_ip = client.client_ip  # asked before a handoff lets go of the client's socket
        got = await self.claimer.claim_and_connect(client, target.name, raw_head)
        if isinstance(got, Refusal):
            self._reject(client, got.error, retry_after=got.retry_after)
        if not isinstance(got, tuple):
            return  # the client left while waiting
        slot, upstream = got
        if isinstance(upstream, HandedOff):
            await self.streams.carry_handed_off(target.name, slot, upstream, client_ip)
            return
        await self.streams.carry(client, target.name, slot, upstream, end)
