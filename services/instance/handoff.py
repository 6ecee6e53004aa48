"""Socket handoff: taking a client's TCP connection from a proxy on the same host, so the proxy is out of the data path.

A proxy that reads a client's request head and claims this instance may, instead of relaying bytes, pass the client's
socket itself over the instance's handoff socket (AUBE_INSTANCE_HANDOFF, a Unix socket in the instance's own folder,
which only the platform and this instance can reach) with SCM_RIGHTS. One control connection per stream:

    proxy -> instance   one offer: a header (">II": parameter length, prefix length), the parameters as JSON
                        (`secret`, `idle_timeout`, `max_duration`, `ack_wait`, `ping_bound`), then the prefix: the
                        bytes the proxy already read (the forwarded request head, which carries the instance
                        credential as in the relay, and whatever followed it). The client's socket rides along with
                        the first bytes.
    instance -> proxy   {"taken": true, "beats": true} (or taken false: busy), then {"ended": reason} once the
                        connection is closed.
    proxy -> instance   {"beat": true} while the stream lasts (every quarter of `ping_bound`), answered with
                        {"beat": true} while the stream's server is live: it sent the client something within the
                        bound (it pings), or the client leaves our bytes in the send queue. A proxy that hears no
                        answer within the bound judges the instance hung (a stopped process, a blocked event loop).
    proxy -> instance   {"ack": true} once the proxy has released (or otherwise settled) its claim.

Only an offer carrying the instance credential is taken (its SHA-256 matches AUBE_INSTANCE_SECRET_SHA256); anything
else is closed at once, the passed socket with it, and no offer is taken at all without a configured credential. The
instance completes the WebSocket handshake on the received socket itself, through the same server (and checks) as a
relayed stream, so the handshake is negotiated end to end, and enforces the stream's limits the proxy passed: no
traffic either way for `idle_timeout`, `max_duration` over, or nothing from the client for `ping_bound` (the
instance pings, so a live client answers within it) shuts the connection down at once (the client sees it close, as
when the proxy ends a relayed stream; without it websockets would wait its close timeout for a hung client).

Closing the received socket shuts it down first: the proxy keeps a copy of it (to end the stream of an instance it
judges hung), so closing this one alone would not end the connection.

A proxy that dies (kill -9) does not end the stream: the socket lives here. Who then accounts for the instance: the
proxy's claim stays in the registry, flagged `handed_off`, and the reaper leaves such a claim alone (until the stream
is 10 s past the longest duration passed here: the function can stop this module enforcing it); the instance, when a
handed-off stream ends without the proxy's ack within `ack_wait` (the proxy is gone), exits, and the control plane
removes the entry of an instance that exited. So the claim is never given to another client while the stream
lasts, and the slot comes back once it ended (docs/handoff.md).

Only the standard library here: this module ships into every function image with the rest of `aube.instance`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import select
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

HEADER = struct.Struct(">II")
MAX_PARAMS = 4096
MAX_PREFIX = 1 << 20
OFFER_TIMEOUT = 5.0  # an offer must arrive whole within this: the proxy sends it in one go
WATCH_TICK = 0.25  # how often the limits are looked at, at most (idle detection samples a byte counter)


class HandedOffSocket(socket.socket):
    """A client's TCP connection received from the proxy: carries the bytes the proxy already read (`prefix`, fed to
    the WebSocket protocol before anything from the socket) and counts the bytes moved either way (idle detection)."""

    prefix: bytes = b""
    moved: int = 0
    received: int = 0  # from the client only: a live one answers pings
    sent: int = 0  # to the client only: a live pinging instance sends at least every ping_interval

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        self.moved += len(data)
        self.received += len(data)
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        n = super().recv_into(buffer, nbytes, flags)
        self.moved += n
        self.received += n
        return n

    def send(self, data: Any, flags: int = 0) -> int:
        n = super().send(data, flags)
        self.moved += n
        self.sent += n
        return n

    def sendall(self, data: Any, flags: int = 0) -> None:
        super().sendall(data, flags)
        n = len(memoryview(data))
        self.moved += n
        self.sent += n

    def sendmsg(self, buffers: Any, *args: Any) -> int:
        n = super().sendmsg(buffers, *args)
        self.moved += n
        self.sent += n
        return n

    def unsent(self) -> int:
        """Bytes in the kernel's send queue not yet acknowledged by the client (0 when it cannot be told)."""
        try:
            raw = fcntl.ioctl(self.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        except OSError:
            return 0
        return int(struct.unpack("i", raw)[0])

    def close(self) -> None:
        # The proxy holds a copy of this socket: the connection ends only once every copy is closed, or shut down.
        if self.fileno() >= 0:
            with contextlib.suppress(OSError):
                self.shutdown(socket.SHUT_RDWR)
        super().close()


@dataclass(frozen=True)
class Offer:
    secret: str
    prefix: bytes
    idle_timeout: float | None
    max_duration: float | None
    ack_wait: float
    ping_bound: float | None = None  # ping_interval + ping_timeout when this instance pings the client


# Starts serving one received connection through the instance's WebSocket server; the future is done once the
# connection is closed. The asyncio server's is its event loop's own future (no thread), the sync server's a thread's
# (`in_thread`).
Serve = Callable[[HandedOffSocket], "concurrent.futures.Future[None]"]


def in_thread(serve: Callable[[HandedOffSocket], None]) -> Serve:
    """`serve`, which returns once the connection is closed, run in a thread of its own."""

    def start(sock: HandedOffSocket) -> concurrent.futures.Future[None]:
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            try:
                serve(sock)
            except BaseException as e:
                done.set_exception(e)
            else:
                done.set_result(None)

        threading.Thread(target=run, name="aube-handoff-serve", daemon=True).start()
        return done

    return start


def parse_offer(data: bytes) -> Offer | None:
    """The offer in `data` (header, JSON parameters, prefix), or None when it is not a valid one."""
    if len(data) < HEADER.size:
        return None
    params_len, prefix_len = HEADER.unpack_from(data)
    if params_len > MAX_PARAMS or prefix_len > MAX_PREFIX or len(data) != HEADER.size + params_len + prefix_len:
        return None
    try:
        params = json.loads(data[HEADER.size : HEADER.size + params_len])
        secret = params["secret"]
        idle, longest, ack_wait = params.get("idle_timeout"), params.get("max_duration"), params["ack_wait"]
        bound = params.get("ping_bound")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    windows = (idle, longest, bound)
    if not isinstance(secret, str) or not all(v is None or isinstance(v, (int, float)) for v in windows):
        return None
    if not isinstance(ack_wait, (int, float)):
        return None
    prefix = data[HEADER.size + params_len :]
    return Offer(secret, prefix, idle or None, longest or None, float(ack_wait), bound or None)


def encode_offer(
    secret: str,
    prefix: bytes,
    idle: float | None,
    longest: float | None,
    ack_wait: float,
    ping_bound: float | None = None,
) -> bytes:
    params = json.dumps(
        {
            "secret": secret,
            "idle_timeout": idle,
            "max_duration": longest,
            "ack_wait": ack_wait,
            "ping_bound": ping_bound,
        }
    )
    raw = params.encode()
    return HEADER.pack(len(raw), len(prefix)) + raw + prefix


def authentic(offer: Offer, secret_sha256: str) -> bool:
    """The offer carries the instance credential; never without one configured (then no handoff is taken)."""
    if not secret_sha256:
        return False
    digest = hashlib.sha256(offer.secret.encode("utf-8", "replace")).hexdigest()
    return hmac.compare_digest(digest, secret_sha256)


class HandoffListener:
    """Accepts the proxy's control connections on the handoff socket, one thread each."""

    def __init__(
        self, path: str, secret_sha256: str, serve: Serve, busy: Callable[[], bool], orphaned: Callable[[], None]
    ) -> None:
        self.path = path
        self.secret_sha256 = secret_sha256
        self.serve = serve
        self.busy = busy
        # Ends the instance as SIGTERM does (`Stopper.stop`), called from the stream's thread: a signal to itself
        # could be given to that thread, and leave the main one asleep in its event loop (its handler unrun).
        self.orphaned = orphaned
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(64)

    def start(self) -> None:
        threading.Thread(target=self._accept, name="aube-handoff", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._control, args=(conn,), name="aube-handoff-stream", daemon=True).start()

    def _control(self, conn: socket.socket) -> None:
        fds: list[int] = []
        taken = acknowledged = False
        try:
            with conn:
                offer, fds = _read_offer(conn)
                if offer is None or not authentic(offer, self.secret_sha256) or len(fds) != 1:
                    logger.warning("refused a handoff without the instance credential (or malformed)")
                    return
                client = HandedOffSocket(fileno=fds.pop())
                # The descriptor shares the proxy's file description, which its event loop made non-blocking, while
                # Python takes a socket made from a descriptor for a blocking one: the sync server's `sendall` would
                # then stop with BlockingIOError (a partial write) as soon as the send buffer is full. The asyncio
                # server sets its own mode; the sync one needs it blocking.
                client.setblocking(True)
                if client.type != socket.SOCK_STREAM or self.busy():
                    os.close(client.detach())  # no shutdown: the connection is still the proxy's
                    _say(conn, {"taken": False})
                    return
                client.prefix = offer.prefix
                taken = True
                reason = self._carry(client, offer, conn)
                logger.info("handed-off stream ended (%s): reporting it", reason)
                acknowledged = _acknowledged(conn, reason, offer.ack_wait)
        except Exception:
            logger.exception("handoff failed")
        finally:
            for fd in fds:
                os.close(fd)
            if taken and not acknowledged:
                # The proxy is gone (or could not settle its claim): whoever held it can no longer account for this
                # instance, so it ends, and the control plane drops its entry (see the module docstring).
                logger.warning("handed-off stream ended without the proxy's acknowledgement: exiting")
                self.orphaned()

    def _carry(self, client: HandedOffSocket, offer: Offer, conn: socket.socket) -> str:
        """Serve the stream until its connection closes; shut it down when it breaks a limit, when the client is
        silent past the ping bound, or when the proxy says {"end": reason} (the registry no longer accounts for this
        instance); answer the proxy's heartbeats meanwhile. Why it ended."""
        # Serving starts before the proxy hears it was taken: the client waits for its handshake answer, the proxy
        # for nothing but its bookkeeping.
        served = self.serve(client)
        _say(conn, {"taken": True, "beats": True})
        reason = "closed"
        started = last_change = time.monotonic()
        last_moved = last_received = last_sent = -1
        last_heard = last_spoke = started
        windows = [w / 4 for w in (offer.idle_timeout, offer.max_duration, offer.ping_bound) if w]
        tick = min([WATCH_TICK, *windows])
        proxy_there = True
        while not concurrent.futures.wait([served], timeout=tick).done:
            now = time.monotonic()
            if client.moved != last_moved:
                last_moved, last_change = client.moved, now
            if client.received != last_received:
                last_received, last_heard = client.received, now
            # While the client does not take our bytes (they wait in the send queue) our silence is its doing.
            if client.sent != last_sent or (offer.ping_bound and client.unsent()):
                last_sent, last_spoke = client.sent, now
            limit = None
            if proxy_there and select.select([conn], [], [], 0)[0]:
                # Only {"end"} and heartbeats come while the stream runs (the ack answers our report of its end).
                said = _read_line(conn)
                proxy_there = said is not None
                if said is not None and said.get("beat"):
                    # Answered only while this stream's server is live: it pings, so it sends within the bound
                    # (unless its event loop is blocked), as the relay judges an instance by the bytes it sends.
                    if not offer.ping_bound or now - last_spoke < offer.ping_bound:
                        proxy_there = _try_say(conn, {"beat": True})
                elif said is not None and said.get("end"):
                    limit = str(said["end"])
            if limit is not None:
                pass
            elif offer.idle_timeout and now - last_change >= offer.idle_timeout:
                limit = "idle_timeout"
            elif offer.max_duration and now - started >= offer.max_duration:
                limit = "max_duration"
            elif offer.ping_bound and now - last_heard >= offer.ping_bound:
                # A live client answers each ping within the bound: this one is hung (or gone without a word).
                limit = "client_silent"
            if limit is not None and reason == "closed":
                reason = limit
                logger.info("handed-off stream reached its %s: closing", limit)
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_RDWR)
        if served.exception() is not None:
            logger.error("serving a handed-off stream failed", exc_info=served.exception())
        return reason


async def take_async(server: Any, sock: HandedOffSocket) -> None:
    """Serve a handed-off client through the websockets asyncio `server`'s own connections (checks, slot, handler,
    shutdown: server.py); return once its connection is closed. The connection feeds `sock.prefix` to its protocol
    as soon as it is made, before the transport reads anything (`AsyncStreamConnection.connection_made`)."""
    # websockets builds each connection (its protocol and options) in the asyncio server's factory, which it keeps
    # under a private name: the one place that knows them all.
    factory = server.server._protocol_factory

    def connection() -> Any:
        made = factory()
        made.handed_prefix = sock.prefix
        return made

    _, taken = await asyncio.get_running_loop().connect_accepted_socket(connection, sock)
    await asyncio.shield(taken.connection_lost_waiter)


def _read_offer(conn: socket.socket) -> tuple[Offer | None, list[int]]:
    conn.settimeout(OFFER_TIMEOUT)
    data, fds, _, _ = socket.recv_fds(conn, 65536, 1)
    buf = bytearray(data)
    if len(buf) >= HEADER.size:
        params_len, prefix_len = HEADER.unpack_from(buf)
        want = HEADER.size + min(params_len, MAX_PARAMS + 1) + min(prefix_len, MAX_PREFIX + 1)
        while len(buf) < want:
            more = conn.recv(want - len(buf))
            if not more:
                break
            buf += more
    return parse_offer(bytes(buf)), list(fds)


def _read_line(conn: socket.socket) -> dict[str, Any] | None:
    """One message of the proxy's; None when it is gone (or said something that is not one)."""
    try:
        conn.settimeout(OFFER_TIMEOUT)
        line = _readline(conn)
        said = json.loads(line) if line else None
    except (OSError, ValueError):
        return None
    return said if isinstance(said, dict) else None


def _readline(conn: socket.socket) -> bytes:
    """One line, read a byte at a time: nothing after it is taken from the socket (the lines are few and short)."""
    line = bytearray()
    while len(line) < MAX_PARAMS:
        byte = conn.recv(1)
        if not byte:
            break
        line += byte
        if byte == b"\n":
            break
    return bytes(line)


def _say(conn: socket.socket, message: dict[str, object]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _try_say(conn: socket.socket, message: dict[str, object]) -> bool:
    """Say `message`; whether the proxy is still there to hear it."""
    try:
        _say(conn, message)
    except OSError:
        return False
    return True


def _acknowledged(conn: socket.socket, reason: str, wait: float) -> bool:
    """Report the stream's end; whether the proxy acknowledges it within `wait` (a heartbeat it sent before it
    heard of the end may come first: skipped)."""
    deadline = time.monotonic() + wait
    try:
        _say(conn, {"ended": reason})
        while (left := deadline - time.monotonic()) > 0:
            conn.settimeout(left)
            line = _readline(conn)
            said = json.loads(line) if line else None
            if not (isinstance(said, dict) and said.get("beat")):
                return isinstance(said, dict) and said.get("ack") is True
    except (OSError, ValueError):
        return False
    return False
