"""Serving one function: the HTTP side (health, 503 when busy, subprotocols), the stream slot, the per-stream
log line, and the two servers: threads (`websockets.sync`) for `def fn(websocket)`, asyncio for the rest. Both stop
when `shutdown.Stopper` says so.

Only the standard library and websockets here: this module ships into every function image.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import websockets.asyncio.server as aserver
import websockets.sync.server as sserver
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import Protocol as WsProtocol
from websockets.protocol import State
from websockets.typing import Subprotocol

from aube.instance.config import LISTENING_MARKER, SECRET_HEADER, SECRET_SHA256_ENV, InstanceConfig
from aube.instance.handlers import exception_reason
from aube.instance.handoff import HandedOffSocket, HandoffListener, Serve, in_thread, on_loop, take_async
from aube.instance.shutdown import Stopper
from aube.instance.slot import StreamSlot

logger = logging.getLogger(__name__)


def start_handoff(
    path: str,
    secret_sha256: str,
    serve: Serve,
    slot: StreamSlot,
    orphaned: Callable[[], None],
    loop: asyncio.AbstractEventLoop | None = None,
) -> None:
    """Take handed-off clients on `path` (on `loop`, which `serve` serves on, when given: HandoffListener); an
    instance that cannot listen there is relayed, it does not fail (a control plane in a container gave it a folder
    the engine made on its own host, which the instance cannot write)."""
    try:
        HandoffListener(path, secret_sha256, serve, slot, orphaned).start(loop)
    except OSError as e:
        logger.warning("no socket handoff (clients are relayed): cannot listen on %s: %s", path, e)


def announce(config: InstanceConfig, flavour: str, port: int) -> None:
    where = f"unix:{config.socket}" if config.socket else f"{config.host}:{port}"
    logger.info("serving %s (%s) on %s", config.fn_dir, flavour, where)
    if not config.secret_sha256:
        logger.warning("%s is not set: anyone who reaches this port is served (fine only by hand)", SECRET_SHA256_ENV)
    print(f"{LISTENING_MARKER} {where}", flush=True)


HEALTH_PATH = "/_aube/health"
RETRY_AFTER_SECONDS = 1
CLEANUP_POLL = 0.01
CLOSE_BUSY = 1013  # "try again later": a stream that lost the slot after its handshake (should not happen)


class _Respond(Protocol):
    def respond(self, status: int, text: str) -> Response: ...


class SyncStreamConnection(sserver.ServerConnection):
    """The `websockets.sync` server connection, counting messages for the stream's log line."""

    messages_in = 0
    messages_out = 0
    slot: StreamSlot | None = None  # the slot this connection claimed at its handshake (`HttpSide._claimed`)

    def __init__(self, sock: Any, protocol: Any, *args: Any, **kwargs: Any) -> None:
        # A handed-off socket (handoff.py): the request head the proxy already read goes to the protocol before
        # the reading thread starts, so nothing read from the socket can overtake it.
        prefix = sock.prefix if isinstance(sock, HandedOffSocket) else b""
        if prefix:
            protocol.receive_data(prefix)
        super().__init__(sock, protocol, *args, **kwargs)
        if prefix:
            with self.protocol_mutex:
                for event in self.protocol.events_received():
                    self.process_event(event)

    def close_socket(self) -> None:
        super().close_socket()
        # Also called when the handshake died after the claim, where no handler will run to release it.
        if self.slot is not None:
            self.slot.abandon(self)

    def recv(self, *args: Any, **kwargs: Any) -> Any:
        message = super().recv(*args, **kwargs)
        self.messages_in += 1
        return message

    def send(self, *args: Any, **kwargs: Any) -> None:
        super().send(*args, **kwargs)
        self.messages_out += 1


class AsyncStreamConnection(aserver.ServerConnection):
    """The `websockets.asyncio` server connection, counting messages for the stream's log line."""

    messages_in = 0
    messages_out = 0
    slot: StreamSlot | None = None  # the slot this connection claimed at its handshake (`HttpSide._claimed`)
    handed_prefix = b""  # a handed-off socket's request head, read by the proxy (handoff.py)
    handshake_answered: Callable[[], None] | None = None  # a handed-off socket's: told once the handshake is over

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().handshake(*args, **kwargs)
        finally:
            if self.handshake_answered is not None:
                self.handshake_answered()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.handed_prefix:
            self.data_received(self.handed_prefix)  # before the transport reads anything from the socket

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        # Also when the handshake died after the claim, where no handler will run to release it.
        if self.slot is not None:
            self.slot.abandon(self)

    async def recv(self, *args: Any, **kwargs: Any) -> Any:
        message = await super().recv(*args, **kwargs)
        self.messages_in += 1
        return message

    async def send(self, *args: Any, **kwargs: Any) -> None:
        await super().send(*args, **kwargs)
        self.messages_out += 1


@dataclass(frozen=True)
class Negotiation:
    """Keyword arguments for either `serve`: the function's subprotocols, or the client's first choice."""

    subprotocols: list[str] | None

    def kwargs(self) -> dict[str, Any]:
        if self.subprotocols is not None:
            # websockets' own rule: the server's first that the client offers; none in common is a 400.
            return {"subprotocols": [Subprotocol(s) for s in self.subprotocols]}
        return {"select_subprotocol": first_offered}


def keepalive(config: InstanceConfig) -> dict[str, Any]:
    """Keyword arguments for either `serve`: the function's ping policy (websockets' keepalive), off at 0, and its
    largest message (`max_size`: a larger one ends the stream with 1009)."""
    return {
        "ping_interval": config.ping_interval or None,
        "ping_timeout": config.ping_timeout,
        "max_size": config.max_message,
    }


def first_offered(connection: object, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    return offered[0] if offered else None


class HttpSide:
    """`process_request` / `process_response` for both servers: health, and the slot claim at handshake."""

    def __init__(self, config: InstanceConfig, slot: StreamSlot) -> None:
        self.config = config
        self.slot = slot
        self.cleanup_wait = config.command_grace + 1.0

    def _busy(self, connection: _Respond) -> Response:
        response = connection.respond(503, "instance busy: it serves one stream at a time\n")
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response

    def _finishing(self) -> bool:
        """The stream holding the slot is over and only its cleanup runs (a command being stopped)."""
        owner = self.slot.owner
        protocol = getattr(owner, "protocol", None)
        return protocol is not None and protocol.state in (State.CLOSING, State.CLOSED)

    def _from_platform(self, request: Request) -> bool:
        """Whether the request carries the instance credential. Its header is removed in any case, before the
        function can see the request: the function never learns the credential, whoever sent it."""
        presented = request.headers.get_all(SECRET_HEADER)
        if presented:
            del request.headers[SECRET_HEADER]  # every copy, whatever the case of its name
        expected = self.config.secret_sha256
        if not expected:
            return True
        # Exactly one copy: the proxy removes the client's and adds its own, so two mean someone else wrote one.
        if len(presented) != 1:
            return False
        digest = hashlib.sha256(presented[0].encode("utf-8", "replace")).hexdigest()
        return hmac.compare_digest(digest, expected)

    def process_request(self, connection: _Respond, request: Request) -> Response | None:
        # Before anything else, the health check included: only the platform learns that this instance exists
        # and whether it is busy, and a refused request never comes near the stream slot.
        if not self._from_platform(request):
            logger.warning("refused a request without the instance credential from %s", _peer(connection))
            return connection.respond(403, "forbidden: this instance answers the platform only\n")
        if request.path.partition("?")[0] == HEALTH_PATH:
            body = json.dumps(self.slot.health(self.config.instance_id)) + "\n"
            response = connection.respond(200, body)
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = "application/json"
            response.headers["Cache-Control"] = "no-store"
            return response
        # Any other path is the function's: the proxy forwards the client's own request line.
        if "Upgrade" in request.headers and self.slot.busy and not self._finishing():
            return self._busy(connection)
        return None

    # Claim only once the handshake is known to succeed, atomically: two racing upgrades cannot both pass.
    # The proxy hands an instance to the next client as soon as the last stream's connection is closed, maybe
    # before that stream's cleanup is done here: such an upgrade waits for the cleanup rather than get a 503.

    def process_response(self, connection: _Respond, request: Request, response: Response) -> Response | None:
        """For the sync server: runs in the connection's own thread, so it may block."""
        if response.status_code != 101:
            return None
        deadline = time.monotonic() + self.cleanup_wait
        while not self.slot.try_claim(connection):
            if not self._finishing() or time.monotonic() > deadline:
                return self._busy(connection)
            time.sleep(CLEANUP_POLL)
        self._claimed(connection)
        return None

    async def process_response_async(
        self, connection: _Respond, request: Request, response: Response
    ) -> Response | None:
        if response.status_code != 101:
            return None
        deadline = time.monotonic() + self.cleanup_wait
        while not self.slot.try_claim(connection):
            if not self._finishing() or time.monotonic() > deadline:
                return self._busy(connection)
            await asyncio.sleep(CLEANUP_POLL)
        self._claimed(connection)
        return None

    def _claimed(self, connection: object) -> None:
        """The connection gives its claim back if it closes before its handler starts: a peer that sent its request
        and left at once (a client that gave up waiting) held the slot for the whole pending timeout, its instance
        counted busy meanwhile, and the proxy then stopped the instance as still busy."""
        if isinstance(connection, (SyncStreamConnection, AsyncStreamConnection)):
            connection.slot = self.slot
            if isinstance(connection, AsyncStreamConnection) and connection.connection_lost_waiter.done():
                self.slot.abandon(connection)  # lost before the claim: its connection_lost has run already


def close_code_of(protocol: WsProtocol) -> tuple[int, str]:
    """The close code and reason of whoever closed first (1006 when no close frame was seen)."""
    rcvd, sent = protocol.close_rcvd, protocol.close_sent
    first = rcvd if protocol.close_rcvd_then_sent or sent is None else sent
    if first is None:
        return 1006, ""
    return int(first.code), first.reason


def log_stream_end(
    config: InstanceConfig,
    path: str,
    started: float,
    messages_in: int,
    messages_out: int,
    protocol: WsProtocol,
    by: str,
) -> None:
    code, reason = close_code_of(protocol)
    logger.info(
        "stream ended function=%s version=%s instance=%s path=%s duration=%.3fs in=%d out=%d code=%d by=%s%s",
        config.function or "-",
        config.version or "-",
        config.instance_id or "-",
        path,
        time.monotonic() - started,
        messages_in,
        messages_out,
        code,
        by,
        f" reason={reason!r}" if reason else "",
    )


def _path(request: Request | None) -> str:
    # Without the query string: it may carry the client's tokens.
    return request.path.partition("?")[0] if request is not None else "?"


def _peer(connection: object) -> str:
    try:
        return str(getattr(connection, "remote_address", None) or "?")
    except OSError:
        return "?"


def _closed_by(protocol: WsProtocol) -> str:
    if protocol.close_rcvd is None and protocol.close_sent is None:
        return "network"
    return "client" if protocol.close_rcvd_then_sent or protocol.close_sent is None else "server"


def serve_sync(
    config: InstanceConfig,
    fn: Callable[[sserver.ServerConnection], Any],
    negotiation: Negotiation,
    stopper: Stopper,
) -> None:
    """`def fn(websocket)`: the websockets.sync server, one thread per connection, as AubeFaaS ran it."""
    slot = StreamSlot()
    http_side = HttpSide(config, slot)
    open_streams: set[SyncStreamConnection] = set()
    lock = threading.Lock()

    def handler(connection: sserver.ServerConnection) -> None:
        assert isinstance(connection, SyncStreamConnection)
        if not slot.start(connection):
            connection.close(CLOSE_BUSY, "instance busy")
            return
        with lock:
            open_streams.add(connection)
        started = time.monotonic()
        code, reason = 1000, ""
        try:
            fn(connection)
        except ConnectionClosed:
            pass  # the client left while the function was talking to it: a normal end
        except Exception as e:
            code, reason = 1011, exception_reason(e)
            logger.warning("function raised: %s", reason, exc_info=True)
        finally:
            try:
                connection.close(code, reason)
            finally:
                with lock:
                    open_streams.discard(connection)
                slot.release(connection)
                log_stream_end(
                    config,
                    _path(connection.request),
                    started,
                    connection.messages_in,
                    connection.messages_out,
                    connection.protocol,
                    _closed_by(connection.protocol),
                )

    options: dict[str, Any] = {
        "process_request": http_side.process_request,
        "process_response": http_side.process_response,
        "create_connection": SyncStreamConnection,
        **negotiation.kwargs(),
        **keepalive(config),
    }
    if config.socket:
        server = sserver.unix_serve(handler, config.socket, **options)
    else:
        server = sserver.serve(handler, config.host, config.port, **options)
    if config.handoff:
        serve_handed_off = in_thread(lambda sock: server.handler(sock, ("handoff", 0)))
        start_handoff(config.handoff, config.secret_sha256, serve_handed_off, slot, stopper.stop)
    announce(config, "sync", 0 if config.socket else server.socket.getsockname()[1])
    thread = threading.Thread(target=server.serve_forever, name="aube-accept", daemon=True)
    thread.start()
    stopper.wait()
    logger.info("stopping: closing open streams with 1001")
    with lock:
        streams = list(open_streams)
    for connection in streams:
        connection.close(1001, "instance stopping")
    server.shutdown()
    thread.join(timeout=config.shutdown_grace)


StreamRunner = Callable[[aserver.ServerConnection], Awaitable[tuple[int, str] | None]]


async def serve_async(
    config: InstanceConfig,
    run: StreamRunner,
    negotiation: Negotiation,
    stopper: Stopper,
    after_stream: Callable[[], object] | None = None,
) -> None:
    """`async def fn`, async generators and commands: the websockets.asyncio server.

    `run` carries one stream and returns the close code and reason it wants, or None for a normal close.
    """
    slot = StreamSlot()
    http_side = HttpSide(config, slot)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stopper.wake = lambda: loop.call_soon_threadsafe(stop.set)
    if stopper.requested:
        stop.set()

    async def handler(connection: aserver.ServerConnection) -> None:
        assert isinstance(connection, AsyncStreamConnection)
        if not slot.start(connection):
            await connection.close(CLOSE_BUSY, "instance busy")
            return
        started = time.monotonic()
        code, reason = 1000, ""
        try:
            outcome = await run(connection)
            if outcome is not None:
                code, reason = outcome
        except ConnectionClosed:
            pass  # the client left while the function was talking to it: a normal end
        except Exception as e:
            code, reason = 1011, exception_reason(e)
            logger.warning("function raised: %s", reason, exc_info=True)
        finally:
            try:
                await connection.close(code, reason)
            finally:
                slot.release(connection)
                log_stream_end(
                    config,
                    _path(connection.request),
                    started,
                    connection.messages_in,
                    connection.messages_out,
                    connection.protocol,
                    _closed_by(connection.protocol),
                )
                if after_stream is not None:
                    after_stream()

    options: dict[str, Any] = {
        "process_request": http_side.process_request,
        "process_response": http_side.process_response_async,
        "create_connection": AsyncStreamConnection,
        **negotiation.kwargs(),
        **keepalive(config),
    }
    if config.socket:
        server = await aserver.unix_serve(handler, config.socket, **options)
    else:
        server = await aserver.serve(handler, config.host, config.port, **options)
    if config.handoff:
        serve_handed_off = on_loop(loop, functools.partial(take_async, server))
        start_handoff(config.handoff, config.secret_sha256, serve_handed_off, slot, stopper.stop, loop)
    port = next(iter(server.sockets)).getsockname()[1] if server.sockets and not config.socket else config.port
    announce(config, "asyncio", 0 if config.socket else port)
    await stop.wait()
    logger.info("stopping: closing open streams with 1001")
    server.close()  # closes open connections with 1001 (going away)
    try:
        await asyncio.wait_for(server.wait_closed(), config.shutdown_grace)
    except TimeoutError:
        logger.warning("streams still open after %.1fs; exiting anyway", config.shutdown_grace)
