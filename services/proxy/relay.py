"""The byte pump: asyncio Protocols that move bytes transport to transport.

A client connection starts in head mode (bytes are buffered for the handshake code to read); once the
instance is connected, `attach` switches both sides to relay mode, where `data_received` writes each chunk
straight to the other transport. Flow control is the transports' own: when one side's write buffer passes
its high-water mark, `pause_writing` pauses reading on the other side, and `resume_writing` resumes it
(`ClientSide.writing_paused` tells the hung-instance check that the instance's silence is then the client's doing).
Per chunk the only Python work is one write and two integer adds (the stream's and the metrics' counters).

Events are asyncio's, not anyio's: protocols are built in loop callbacks, outside any task, where anyio cannot
tell which backend runs. The service only runs on asyncio (or uvloop), whose transports these are.

The instance's side starts in head mode too: its response head is held back (`head`, `head_done`) until the
service has read it, because an instance that answers "busy" (503) must not reach the client: the client is sent to
another instance instead, over a new connection. Only `start_relay` forwards the head and switches to relay mode;
until then the instance closing does not touch the client.

Closing: EOF or loss on either side closes the other one (`close` flushes what is buffered first); the
service waits for both sides with a bounded grace and aborts what will not close.

Once the instance's answer has been forwarded, the bytes of most streams leave these protocols for the native relay
engine (native_relay.py); `Legs` is what stream supervision sees of either engine, `ProtocolLegs` this one's.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

import anyio

from aube.proxy.metrics import Metrics

WRITE_HIGH_WATER = 256 * 1024
MAX_RESPONSE_HEAD = 16 * 1024  # an instance's response head is the platform's own few lines; more is not a head


class ClientSide(asyncio.Protocol):
    def __init__(self, metrics: Metrics, max_buffer: int) -> None:
        self.metrics = metrics
        self.max_buffer = max_buffer
        self.transport: asyncio.Transport | None = None
        self.peer: UpstreamSide | None = None
        self._to_peer: asyncio.Transport | None = None  # the instance's transport, once attached
        self.buffer = bytearray()
        self.eof = False
        self.lost = asyncio.Event()
        self.ended = asyncio.Event()  # the client sent EOF or either side's connection is gone
        self.bytes_in = 0  # client -> instance, relayed
        self.writing_paused = False  # the client leg's write buffer is full: the instance is not being read
        self._data = asyncio.Event()

    # -- head mode ---------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    async def wait_data(self) -> None:
        """Return when bytes arrived, the client sent EOF or the connection was lost since the last call."""
        if self.eof or self.lost.is_set():
            return
        self._data = asyncio.Event()
        await self._data.wait()

    @property
    def gone(self) -> bool:
        """The client left, or its connection was let go here (a handoff whose answer never came): nothing more may
        be done for it, though `ended` is set only once the loop has run the transport's callbacks."""
        return self.ended.is_set() or self.transport is None or self.transport.is_closing()

    def take_buffer(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    @property
    def client_ip(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return str(peer[0]) if peer else "unknown"

    def answer(self, data: bytes) -> None:
        """Send a plain HTTP response and end the connection."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            self.transport.close()

    # -- relay mode --------------------------------------------------------------------------------------

    def attach(self, peer: UpstreamSide) -> None:
        self.peer = peer
        self._to_peer = peer.transport
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()  # it may have been paused at the head buffer limit

    def data_received(self, data: bytes) -> None:
        to_peer = self._to_peer
        if to_peer is not None:
            n = len(data)
            self.bytes_in += n
            self.metrics.bytes_client_to_instance += n
            to_peer.write(data)
            return
        self.buffer += data
        self._data.set()
        if len(self.buffer) > self.max_buffer and self.transport is not None:
            self.transport.pause_reading()  # the head code answers 431; stop taking more meanwhile

    def eof_received(self) -> bool:
        self.eof = True
        self._data.set()
        self.ended.set()
        if self.peer is not None:
            self.peer.transport.close()
            return False
        # Before the upgrade, a client that half-closes after its request still gets the answer.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._data.set()
        self.lost.set()
        self.ended.set()
        if self.peer is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.peer is not None and not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class UpstreamSide(asyncio.Protocol):
    """The proxy's connection to an instance: its response head is held until `start_relay`, then every byte it
    receives goes to the client."""

    def __init__(self, client: ClientSide) -> None:
        self.client = client
        self.metrics = client.metrics
        self.bytes_out = 0  # instance -> client
        self._to_client: asyncio.Transport | None = None  # set by start_relay
        self.lost = asyncio.Event()
        self.eof_from_instance = False
        self._transport: asyncio.Transport | None = None
        self.head = bytearray()  # the instance's response, held until the service has read its head
        self.head_done = asyncio.Event()  # the head is complete, too long, or the instance went away

    @property
    def transport(self) -> asyncio.Transport:
        assert self._transport is not None
        return self._transport

    @property
    def relaying(self) -> bool:
        return self._to_client is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def start_relay(self) -> None:
        """Forward the held response to the client and relay everything after it."""
        self._to_client = self.client.transport
        held = bytes(self.head)
        self.head.clear()
        if held:
            self.data_received(held)
        if (self.eof_from_instance or self.lost.is_set()) and self._to_client is not None:
            self._to_client.close()
            self.client.ended.set()

    def data_received(self, data: bytes) -> None:
        to_client = self._to_client
        if to_client is None:
            self.head += data
            if b"\r\n\r\n" in self.head or len(self.head) > MAX_RESPONSE_HEAD:
                self.head_done.set()
            return
        n = len(data)
        self.bytes_out += n
        self.metrics.bytes_instance_to_client += n
        to_client.write(data)

    def eof_received(self) -> bool:
        self.eof_from_instance = True
        self.head_done.set()
        if self._to_client is not None:
            self._to_client.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()
        self.head_done.set()
        if self._to_client is not None:
            self.client.ended.set()
            self._to_client.close()

    def pause_writing(self) -> None:
        ct = self.client.transport
        if ct is not None:
            ct.pause_reading()

    def resume_writing(self) -> None:
        ct = self.client.transport
        if ct is not None and not ct.is_closing():
            ct.resume_reading()


class Legs(Protocol):
    """A relayed stream's two legs as its supervision sees them, whichever engine moves the bytes."""

    @property
    def ended(self) -> asyncio.Event:
        """Set when either side ended the stream (and to wake the supervision early)."""
        ...

    @property
    def bytes_in(self) -> int: ...  # client -> instance, relayed so far

    @property
    def bytes_out(self) -> int: ...  # instance -> client

    @property
    def client_full(self) -> bool:
        """The client leg holds bytes the client has not taken: the instance is not being read meanwhile."""
        ...

    def closed_by(self) -> str | None:
        """`instance_closed` or `client_closed` once a side ended the stream, `relay_failed` when the engine ended it
        with neither; None while it runs."""
        ...

    async def close(self, grace: float) -> None:
        """Close both legs; what the engine holds for either side is delivered first, within about `grace` seconds.
        As with any close, bytes a peer sent that were not read yet are dropped (its kernel may then reset)."""
        ...


class ProtocolLegs:
    """`Legs` over the two protocols above, for streams whose bytes stay in the event loop."""

    def __init__(self, client: ClientSide, upstream: UpstreamSide) -> None:
        self.client = client
        self.upstream = upstream

    @property
    def ended(self) -> asyncio.Event:
        return self.client.ended

    @property
    def bytes_in(self) -> int:
        return self.client.bytes_in

    @property
    def bytes_out(self) -> int:
        return self.upstream.bytes_out

    @property
    def client_full(self) -> bool:
        return self.client.writing_paused

    def closed_by(self) -> str | None:
        if self.upstream.lost.is_set() or self.upstream.eof_from_instance:
            return "instance_closed"
        if self.client.lost.is_set() or self.client.eof:
            return "client_closed"
        return None

    async def close(self, grace: float) -> None:
        upstream = self.upstream
        if not upstream.lost.is_set():
            upstream.transport.close()
            with anyio.move_on_after(grace):
                await upstream.lost.wait()
            if not upstream.lost.is_set():
                upstream.transport.abort()
        if self.client.transport is not None:
            self.client.transport.close()
