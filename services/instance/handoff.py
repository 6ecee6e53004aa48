"""Socket handoff: taking a client's TCP connection from a proxy on the same host, so the proxy is out of the data path.

A proxy that reads a client's request head and claims this instance may, instead of relaying bytes, pass the client's
socket itself over the instance's handoff socket (AUBE_INSTANCE_HANDOFF, a Unix socket in the instance's own folder,
which only the platform and this instance can reach) with SCM_RIGHTS. One control connection per stream, whose
messages are aube.instance.handoff_wire's: the offer, with the socket; the instance says whether it took it, answers
heartbeats and reports the end (and whether the handler returned); the proxy acknowledges once it settled its claim.

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
lasts, and the slot comes back once it ended (docs/handoff.md). A proxy that keeps the claim, still flagged, for its
next client after the stream ("kept" with the ack) has the instance hold the control connection (`Kept`): it exits
too should that proxy die before it releases the claim or offers the next stream.

Only the standard library here: this module ships into every function image with the rest of `aube.instance`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import logging
import os
import select
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from aube.instance.handoff_threads import Kept, Workers
from aube.instance.handoff_wire import (
    OFFER_TIMEOUT,
    Offer,
    authentic,
    offer_size,
    parse_offer,
    read_line,
    report_end,
    say,
    try_say,
)
from aube.instance.slot import StreamSlot

logger = logging.getLogger(__name__)

# Taken: heartbeats are answered, and a kept claim is held (handoff_wire).
TAKEN: dict[str, object] = {"taken": True, "beats": True, "keeps": True}
# A stream's handler usually returns as its connection closes: the end's report waits this long for it.
HANDLER_SETTLE = 0.5
WATCH_TICK = 0.25  # how often the limits are looked at, at most (idle detection samples a byte counter)


class HandedOffSocket(socket.socket):
    """A client's TCP connection received from the proxy: carries the bytes the proxy already read (`prefix`, fed to
    the WebSocket protocol before anything from the socket) and counts the bytes moved either way (idle detection)."""

    prefix: bytes = b""
    answered: Callable[[], None] | None = None  # called once the server has answered the client's handshake
    number = 0  # streams taken by this instance, this one included (`Kept`)
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


# Starts serving one received connection through the instance's WebSocket server; the future is done once the
# connection is closed. The asyncio server's is set by its task on the event loop (`on_loop`: no thread), the sync
# server's by a thread (`in_thread`).
Serve = Callable[[HandedOffSocket], "concurrent.futures.Future[None]"]


_Received = tuple[bytes, list[int]]  # what the first read of an offer brought: its first bytes, the descriptors
_Taken = tuple[HandedOffSocket, Offer, "concurrent.futures.Future[None]"]  # a client being served, and its offer


def on_loop(loop: asyncio.AbstractEventLoop, serve: Callable[[HandedOffSocket], Coroutine[Any, Any, None]]) -> Serve:
    """`serve` as a task of `loop`: started at once from a callback of that loop (`HandoffListener.start(loop)`),
    else handed to it (an offer that a thread finished reading)."""

    def start(sock: HandedOffSocket) -> concurrent.futures.Future[None]:
        try:
            on_this_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_this_loop = False
        if not on_this_loop:
            return asyncio.run_coroutine_threadsafe(serve(sock), loop)
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def finished(task: asyncio.Task[None]) -> None:
            if task.cancelled():
                done.cancel()
            elif task.exception() is not None:
                done.set_exception(task.exception())
            else:
                done.set_result(None)

        loop.create_task(serve(sock)).add_done_callback(finished)
        return done

    return start


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


class HandoffListener:
    """Accepts the proxy's control connections on the handoff socket.

    Without an event loop (the sync server), a thread accepts them and a worker thread carries each stream (workers
    are reused, `Workers`). With the
    asyncio server's loop (`start(loop)`), the loop accepts each, reads its offer and starts serving the client, all
    in its own callbacks: the client's handshake answer waits for no thread to start and no hop between threads
    (measured on a handoff: 0.12 ms to start the thread, 0.15 ms to hand the socket to the loop). A thread then
    follows the stream (limits, heartbeats, the end's report) as in the threaded mode; an offer not yet complete
    when first read is finished there too."""

    def __init__(
        self, path: str, secret_sha256: str, serve: Serve, slot: StreamSlot, orphaned: Callable[[], None]
    ) -> None:
        self.path = path
        self.secret_sha256 = secret_sha256
        self.serve = serve
        self.slot = slot
        # Ends the instance as SIGTERM does (`Stopper.stop`), called from the stream's thread: a signal to itself
        # could be given to that thread, and leave the main one asleep in its event loop (its handler unrun).
        self.orphaned = orphaned
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(64)
        self.workers = Workers()
        self.kept = Kept()

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if loop is None:
            threading.Thread(target=self._accept, name="aube-handoff", daemon=True).start()
            return
        self.sock.setblocking(False)
        loop.add_reader(self.sock.fileno(), self._accepted_on_loop, loop)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._follow_in_thread(conn)

    def _follow_in_thread(
        self,
        conn: socket.socket,
        received: _Received | None = None,
        taken: _Taken | None = None,
        announced: bool = False,
    ) -> None:
        self.workers.run(self._control, conn, received, taken, announced)

    def _accepted_on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                logger.warning("no more handoffs: the handoff socket failed (%s)", e)
                loop.remove_reader(self.sock.fileno())
                return
            conn.setblocking(False)
            # The proxy sends its offer right after connecting: usually here by the time this runs, else soon.
            expiry = loop.call_later(OFFER_TIMEOUT, self._offer_late, loop, conn)
            loop.add_reader(conn.fileno(), self._offer_on_loop, loop, conn, expiry)
            self._offer_on_loop(loop, conn, expiry)

    def _offer_late(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        logger.warning("refused a handoff: no offer within %.0fs", OFFER_TIMEOUT)
        loop.remove_reader(conn.fileno())
        conn.close()

    def _offer_on_loop(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, expiry: asyncio.Handle) -> None:
        """Read the offer once it is there; take it here when it came whole, else finish it in a thread."""
        if conn.fileno() < 0:
            return
        try:
            first = socket.recv_fds(conn, 65536, 1)
        except BlockingIOError:
            return
        except OSError:
            first = (b"", [], 0, None)
        expiry.cancel()
        loop.remove_reader(conn.fileno())
        data, fds = first[0], list(first[1])
        if len(data) < offer_size(data):
            try:
                conn.setblocking(True)
                self._follow_in_thread(conn, received=(data, fds))
            except Exception:
                logger.exception("handoff failed: no thread to read the offer")
                for fd in fds:
                    os.close(fd)
                conn.close()
            return
        try:
            taken = self._take(conn, parse_offer(data), fds)
        except Exception:
            logger.exception("handoff failed")
            taken = None
        finally:
            for fd in fds:
                os.close(fd)
        if taken is None:
            conn.close()
            return
        # Said from here, the proxy hears it at once. The thread that follows the stream starts only once the
        # client's handshake is answered (or its connection ends): waking it earlier took the interpreter lock from
        # the handshake (0.09 ms of the time to the 101, measured).
        try_say(conn, TAKEN)
        client, _, served = taken
        started = threading.Lock()

        def follow() -> None:
            if started.acquire(blocking=False):
                try:
                    conn.setblocking(True)
                    self._follow_in_thread(conn, taken=taken, announced=True)
                except Exception:
                    # No thread to follow the stream (none could start): the proxy, its connection closed, judges
                    # the instance gone, cuts the client and has the instance stopped.
                    logger.exception("handoff failed: no thread to follow the stream")
                    conn.close()

        client.answered = follow
        served.add_done_callback(lambda _: follow())

    def _take(self, conn: socket.socket, offer: Offer | None, fds: list[int]) -> _Taken | None:
        """Check the offer; when it is good and this instance free, start serving its client (the one descriptor is
        taken out of `fds`). None: refused (said so to the proxy when it was only busy)."""
        if offer is None or not authentic(offer, self.secret_sha256) or len(fds) != 1:
            logger.warning("refused a handoff without the instance credential (or malformed)")
            return None
        client = HandedOffSocket(fileno=fds.pop())
        # The descriptor shares the proxy's file description, which its event loop made non-blocking, while
        # Python takes a socket made from a descriptor for a blocking one: the sync server's `sendall` would
        # then stop with BlockingIOError (a partial write) as soon as the send buffer is full. The asyncio
        # server sets its own mode; the sync one needs it blocking.
        client.setblocking(True)
        if client.type != socket.SOCK_STREAM or self.slot.busy:
            os.close(client.detach())  # no shutdown: the connection is still the proxy's
            try_say(conn, {"taken": False})
            return None
        client.prefix = offer.prefix
        client.number = self.kept.supersede()  # a kept claim's next stream: the proxy knows this instance again
        # Serving starts before the proxy hears it was taken: the client waits for its handshake answer, the proxy
        # for nothing but its bookkeeping.
        return client, offer, self.serve(client)

    def _control(self, conn: socket.socket, received: _Received | None, taken: _Taken | None, announced: bool) -> None:
        """The control connection, in its own thread: the offer (unless the loop `taken` it, or `received` its
        first part), that it was taken (unless `announced` already), the stream, its end."""
        fds: list[int] = []
        acknowledged = False
        try:
            with conn:
                if taken is None:
                    offer, fds = _read_offer(conn, received)
                    taken = self._take(conn, offer, fds)
                if taken is None:
                    return
                client, offer, served = taken
                if not announced:
                    say(conn, TAKEN)
                reason = self._carry(client, offer, conn, served)
                logger.info("handed-off stream ended (%s): reporting it", reason)
                # Whether its handler returned too: then the proxy need not ask (health) before it settles the claim.
                free = self.slot.wait_free(HANDLER_SETTLE)
                answer = report_end(conn, {"ended": reason, "free": free}, offer.ack_wait)
                acknowledged = answer is not None and (not answer.get("kept") or self.kept.hold(conn, client.number))
        except Exception:
            logger.exception("handoff failed")
        finally:
            for fd in fds:
                os.close(fd)
            if taken is not None and not acknowledged:
                # The proxy is gone (or could not settle its claim): whoever held it can no longer account for this
                # instance, so it ends, and the control plane drops its entry (see the module docstring).
                logger.warning("handed-off stream ended without the proxy's acknowledgement: exiting")
                self.orphaned()

    def _carry(
        self, client: HandedOffSocket, offer: Offer, conn: socket.socket, served: concurrent.futures.Future[None]
    ) -> str:
        """Serve the stream until its connection closes; shut it down when it breaks a limit, when the client is
        silent past the ping bound, or when the proxy says {"end": reason} (the registry no longer accounts for this
        instance); answer the proxy's heartbeats meanwhile. Why it ended."""
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
                said = read_line(conn)
                proxy_there = said is not None
                if said is not None and said.get("beat"):
                    # Answered only while this stream's server is live: it pings, so it sends within the bound
                    # (unless its event loop is blocked), as the relay judges an instance by the bytes it sends.
                    if not offer.ping_bound or now - last_spoke < offer.ping_bound:
                        proxy_there = try_say(conn, {"beat": True})
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
        made.handshake_answered = sock.answered
        return made

    _, taken = await asyncio.get_running_loop().connect_accepted_socket(connection, sock)
    await asyncio.shield(taken.connection_lost_waiter)


def _read_offer(conn: socket.socket, first: _Received | None = None) -> tuple[Offer | None, list[int]]:
    """Read an offer, or the rest of one whose first part (and descriptors) the event loop read."""
    conn.settimeout(OFFER_TIMEOUT)
    data, fds = first if first is not None else socket.recv_fds(conn, 65536, 1)[:2]
    buf = bytearray(data)
    while len(buf) < offer_size(buf):
        more = conn.recv(offer_size(buf) - len(buf))
        if not more:
            break
        buf += more
    return parse_offer(bytes(buf)), list(fds)
