"""The native relay engine (native/relay) on real sockets: bytes intact and counted both ways, each way a stream can
end, flow control against a client that does not read, and every descriptor it was given closed at the end.

The engine is what carries relayed streams' bytes in the proxy; the proxy's side of it (the hand-over, supervision)
is tested through a real proxy in test_proxy_gateway.py (and every relayed stream of the other tests runs on it).
Where the module is not built these tests skip, except with AUBE_REQUIRE_NATIVE=1 (CI).
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from aube.proxy import native_relay

if not native_relay.available():
    if os.environ.get("AUBE_REQUIRE_NATIVE") == "1":
        raise RuntimeError("AUBE_REQUIRE_NATIVE=1 but aube.proxy._native_relay is not built (scripts/setup.sh)")
    pytest.skip("the native relay engine is not built here", allow_module_level=True)

from aube.proxy._native_relay import Engine, Pump


@pytest.fixture
def engine() -> Iterator[Engine]:
    made = Engine()
    try:
        yield made
    finally:
        made.shutdown()


@dataclass
class Stream:
    client: socket.socket  # the client's end
    instance: socket.socket  # the instance's end
    pump: Pump
    legs: tuple[int, int]  # the descriptors the engine was given


def pair(tcp: bool) -> tuple[socket.socket, socket.socket]:
    if not tcp:
        return socket.socketpair()
    with socket.create_server(("127.0.0.1", 0)) as server:
        near = socket.create_connection(server.getsockname())
        far, _ = server.accept()
    return near, far


@contextmanager
def relayed(engine: Engine, *, tcp: bool = False) -> Iterator[Stream]:
    """A stream through the engine: the test holds the client's and the instance's ends, the engine the middle."""
    client, proxy_client_leg = pair(tcp)
    proxy_instance_leg, instance = pair(tcp)
    for leg in (proxy_client_leg, proxy_instance_leg):
        leg.setblocking(False)
    legs = (proxy_client_leg.detach(), proxy_instance_leg.detach())
    pump = engine.start(*legs)
    try:
        yield Stream(client, instance, pump, legs)
    finally:
        client.close()
        instance.close()


def wait_ended(engine: Engine, pump: Pump, timeout: float = 10.0) -> str:
    """Wait for the engine to announce `pump`'s end, as the proxy's event loop does (the eventfd, then the queue)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([engine.notify_fd], [], [], 0.1)[0]:
            os.read(engine.notify_fd, 8)
            if pump.id in engine.take_ended():
                assert pump.end is not None
                return pump.end
    raise AssertionError(f"the engine did not announce the stream's end within {timeout}s (end={pump.end})")


def receive_exactly(sock: socket.socket, size: int, timeout: float = 30.0) -> bytes:
    sock.settimeout(timeout)
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(min(1 << 20, size - got))
        assert chunk, f"EOF after {got} of {size} bytes"
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def receive_to_eof(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_bytes_flow_both_ways_at_once_intact_and_counted(engine: Engine, tcp: bool) -> None:
    size = 8 * 1024 * 1024 + 13
    upward, downward = os.urandom(size), os.urandom(size)
    with relayed(engine, tcp=tcp) as s:
        got: dict[str, bytes] = {}
        readers = [
            threading.Thread(target=lambda: got.__setitem__("instance", receive_exactly(s.instance, size))),
            threading.Thread(target=lambda: got.__setitem__("client", receive_exactly(s.client, size))),
        ]
        writers = [
            threading.Thread(target=s.client.sendall, args=(upward,)),
            threading.Thread(target=s.instance.sendall, args=(downward,)),
        ]
        for t in readers + writers:
            t.start()
        for t in readers + writers:
            t.join(60)
        assert hashlib.sha256(got["instance"]).digest() == hashlib.sha256(upward).digest()
        assert hashlib.sha256(got["client"]).digest() == hashlib.sha256(downward).digest()
        assert (s.pump.bytes_in, s.pump.bytes_out) == (size, size)
        assert (engine.total_in, engine.total_out) == (size, size)
        assert s.pump.end is None


def test_client_eof_ends_the_stream_and_closes_the_instance_leg(engine: Engine) -> None:
    with relayed(engine) as s:
        s.client.sendall(b"last words")
        s.client.shutdown(socket.SHUT_WR)
        assert receive_to_eof(s.instance) == b"last words"  # delivered, then the instance sees the leg end
        assert wait_ended(engine, s.pump) == "client_closed"


def test_instance_close_delivers_everything_it_sent_first(engine: Engine) -> None:
    payload = os.urandom(3 * 1024 * 1024)
    with relayed(engine) as s:
        sender = threading.Thread(target=lambda: (s.instance.sendall(payload), s.instance.close()))
        sender.start()
        assert receive_to_eof(s.client) == payload
        sender.join(10)
        assert wait_ended(engine, s.pump) == "instance_closed"
        assert s.pump.bytes_out == len(payload)


def test_an_instance_reset_is_an_instance_error(engine: Engine) -> None:
    with relayed(engine, tcp=True) as s:
        s.instance.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.instance.sendall(b"x")
        time.sleep(0.1)  # the engine relays the byte; closing with linger 0 then sends a reset
        s.instance.close()
        assert wait_ended(engine, s.pump) == "instance_error"
        assert receive_to_eof(s.client) == b"x"


def test_close_from_the_proxy_ends_both_legs(engine: Engine) -> None:
    with relayed(engine) as s:
        s.client.sendall(b"ping")
        assert receive_exactly(s.instance, 4) == b"ping"
        s.pump.close()
        assert wait_ended(engine, s.pump) == "closed"
        assert receive_to_eof(s.client) == b""
        assert receive_to_eof(s.instance) == b""


def test_a_client_that_does_not_read_stops_the_instance_being_read(engine: Engine) -> None:
    """The engine holds at most one chunk for a slow client, then stops reading the instance: the instance's own
    sends block, nothing piles up in the proxy, and `client_full` says the instance's silence is the client's."""
    with relayed(engine) as s:
        sent = flood_until_stalled(s.instance)
        assert sent < 8 * 1024 * 1024, "the engine kept reading a stream whose client reads nothing"
        assert s.pump.client_full
        # The kernel's buffers on both socket pairs plus the one chunk the engine holds: a few MiB at most.
        print(f"an instance could send {sent / 1024:.0f} KiB towards a client that reads nothing")
        assert receive_exactly(s.client, sent) == b"z" * sent
        deadline = time.monotonic() + 5
        while s.pump.client_full and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not s.pump.client_full
        assert s.pump.bytes_out == sent


def flood_until_stalled(sender: socket.socket) -> int:
    """Send until the relay stops taking bytes for a second (its reader reads nothing); how many were taken."""
    sender.setblocking(False)
    sent, stalled_since, block = 0, None, b"z" * 65536
    while True:
        try:
            sent += sender.send(block)
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 1.0:
                sender.setblocking(True)
                return sent
            time.sleep(0.01)


def test_what_the_engine_holds_is_delivered_when_the_other_side_ends(engine: Engine) -> None:
    """A client that read nothing, then half-closes: the stream ends, and every byte the engine took from the
    instance still reaches the client (the event loop's relay flushed on close; so does the engine)."""
    with relayed(engine) as s:
        sent = flood_until_stalled(s.instance)
        assert s.pump.client_full  # the engine holds part of a chunk for the client
        s.client.shutdown(socket.SHUT_WR)
        received = receive_to_eof(s.client)
        assert wait_ended(engine, s.pump) == "client_closed"
        assert len(received) == s.pump.bytes_out
        assert received == b"z" * len(received)
        print(f"the instance sent {sent} bytes, the engine read {s.pump.bytes_out}, the client got all of those")


def test_what_the_engine_holds_is_delivered_when_the_proxy_closes(engine: Engine) -> None:
    with relayed(engine) as s:
        flood_until_stalled(s.instance)
        assert s.pump.client_full
        s.pump.close()  # a limit, or shutdown
        received = receive_to_eof(s.client)
        assert wait_ended(engine, s.pump) == "closed"
        assert len(received) == s.pump.bytes_out


def test_a_client_that_never_reads_is_cut_after_the_flush_grace(engine: Engine) -> None:
    """Delivering what it holds is bounded: a client that reads nothing does not keep a closed stream open."""
    with relayed(engine) as s:
        flood_until_stalled(s.instance)
        started = time.monotonic()
        s.pump.close()
        assert wait_ended(engine, s.pump) == "closed"
        took = time.monotonic() - started
        print(f"ended {took:.2f}s after the close (bound: 2 s)")
        assert 1.5 < took < 8


def test_every_descriptor_it_was_given_is_closed_at_the_end(engine: Engine) -> None:
    before = open_descriptors()
    for _ in range(50):
        with relayed(engine) as s:
            s.client.sendall(b"hi")
            assert receive_exactly(s.instance, 2) == b"hi"
            s.client.shutdown(socket.SHUT_WR)
            wait_ended(engine, s.pump)
    assert open_descriptors() == before


def test_shutdown_ends_running_streams_and_refuses_new_ones() -> None:
    engine = Engine()
    with relayed(engine) as s:
        engine.shutdown()
        assert all(map(is_closed, s.legs))  # the running stream's legs were closed with the engine
        assert s.pump.end == "closed"
        assert receive_to_eof(s.client) == b""
        assert receive_to_eof(s.instance) == b""
        refused = socket.socketpair()
        fds = (refused[0].detach(), refused[1].detach())
        with pytest.raises(OSError, match="shut down"):
            engine.start(*fds)
        assert all(map(is_closed, fds))  # refused, and closed all the same: the engine owns what it is given


def test_two_descriptors_are_needed(engine: Engine) -> None:
    a = socket.socket()
    try:
        with pytest.raises(OSError, match="two distinct open descriptors"):
            engine.start(a.fileno(), a.fileno())
        with pytest.raises(OSError, match="two distinct open descriptors"):
            engine.start(-1, a.fileno())
    finally:
        a.close()


def test_a_descriptor_that_is_not_a_socket_ends_the_stream_without_harm(engine: Engine, tmp_path: Any) -> None:
    client, leg = socket.socketpair()
    with open(tmp_path / "not-a-socket", "wb") as regular, client:  # epoll refuses a regular file
        pump = engine.start(leg.detach(), os.dup(regular.fileno()))
        assert wait_ended(engine, pump) == "closed"
        assert receive_to_eof(client) == b""  # the socket it was given was closed
