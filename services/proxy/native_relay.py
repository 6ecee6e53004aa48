"""The native relay engine's Python side: hands a relayed stream's two sockets to `_native_relay` once the instance's
answer has been forwarded, and supervises it from here without touching a byte.

Why: the protocols in relay.py pay a callback, a new `bytes` and a `transport.write` per chunk in each direction on
the event loop. The engine (native/relay, Rust) moves the bytes on a thread of its own: a `recv` into one buffer
shared by all streams, then a `send`, per chunk. The stream's head, the instance's answer (including a 503 that sends
the client elsewhere) and everything before stay in the protocols; only the established stream moves.

The hand-over: both sockets are duplicated for the engine, then the event loop's transports are aborted, which
closes the loop's descriptors only (the sockets live on in the engine's duplicates; no FIN, no RST). It happens in one
step of the loop, with nothing queued in either transport: a stream whose transports still hold bytes (the client
was not reading the instance's answer) keeps the Python relay, as does one that ended already.

What stays here: the byte counters and whether the client leg is full (`Legs`, sampled by stream supervision for
idle and hung-instance detection), why the stream ended, `close` (limits, shutdown) and the metrics' byte totals.
The engine announces each stream's end through an eventfd the event loop watches (`_on_ended`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import TYPE_CHECKING

import anyio

from aube.proxy.relay import ClientSide, UpstreamSide

if TYPE_CHECKING:
    from aube.proxy._native_relay import Engine, Pump

try:
    from aube.proxy import _native_relay
except ImportError:  # not built here (no Rust toolchain when installed): the Python relay serves alone
    _native_relay = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

# Why a stream ended, as the engine says it, in stream supervision's words. `closed` before the proxy closed the
# stream means the engine let go of it by itself (its sockets could not be watched, or the engine stopped).
_CLOSED_BY = {
    "client_closed": "client_closed",
    "client_error": "client_closed",
    "instance_closed": "instance_closed",
    "instance_error": "instance_closed",
    "closed": "relay_failed",
}


def available() -> bool:
    """The engine's compiled module is installed."""
    return _native_relay is not None


class NativeLegs:
    """`Legs` (relay.py) of a stream the engine carries."""

    def __init__(self, pump: Pump) -> None:
        self.pump = pump
        self.ended = asyncio.Event()  # the stream ended, or supervision is woken (the instance's entry went away)
        self.released = asyncio.Event()  # the engine announced the end: it closed both sockets

    @property
    def bytes_in(self) -> int:
        return self.pump.bytes_in

    @property
    def bytes_out(self) -> int:
        return self.pump.bytes_out

    @property
    def client_full(self) -> bool:
        return self.pump.client_full

    def closed_by(self) -> str | None:
        end = self.pump.end
        return _CLOSED_BY.get(end) if end is not None else None

    async def close(self, grace: float) -> None:
        # The engine delivers what it holds for either side, then closes both sockets; `released` is its word that
        # it let go of them.
        self.pump.close()
        with anyio.move_on_after(grace + 1):  # the engine's own flush bound is 2 s, the same as CLOSE_GRACE
            await self.released.wait()


class NativeRelay:
    """One engine per proxy replica: `take` moves a stream into it; `shutdown` ends the engine's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        if _native_relay is None:
            raise RuntimeError("the native relay engine is not installed (native/relay; scripts/setup.sh builds it)")
        self.loop = loop
        self.engine: Engine = _native_relay.Engine()
        self.carried: dict[int, NativeLegs] = {}
        loop.add_reader(self.engine.notify_fd, self._on_ended)

    def take(self, client: ClientSide, upstream: UpstreamSide) -> NativeLegs | None:
        """Move the stream's bytes into the engine; None (the protocols carry on) when it cannot be moved whole."""
        client_transport, upstream_transport = client.transport, upstream._transport
        if client_transport is None or upstream_transport is None:
            return None
        if client.ended.is_set() or upstream.lost.is_set() or upstream.eof_from_instance:
            return None
        if client_transport.is_closing() or upstream_transport.is_closing():
            return None
        if client_transport.get_write_buffer_size() or upstream_transport.get_write_buffer_size():
            return None  # bytes still queued in the loop would be lost or reordered
        client_fd = upstream_fd = -1
        try:
            client_fd = os.dup(client_transport.get_extra_info("socket").fileno())
            upstream_fd = os.dup(upstream_transport.get_extra_info("socket").fileno())
        except (OSError, AttributeError) as exc:
            for fd in (client_fd, upstream_fd):
                if fd >= 0:
                    os.close(fd)
            log.warning("could not hand a stream to the native relay engine (%s): relaying in Python", exc)
            return None
        # From here the engine owns the duplicates, and the loop's transports must not read or write again.
        client_transport.abort()
        upstream_transport.abort()
        legs = NativeLegs(self.engine.start(client_fd, upstream_fd))
        self.carried[legs.pump.id] = legs
        return legs

    @property
    def totals(self) -> tuple[int, int]:
        """Bytes the engine relayed client -> instance and instance -> client, running streams included."""
        return self.engine.total_in, self.engine.total_out

    def _on_ended(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.engine.notify_fd, 8)
        for stream_id in self.engine.take_ended():
            legs = self.carried.pop(stream_id, None)
            if legs is not None:
                legs.released.set()
                legs.ended.set()

    def shutdown(self) -> None:
        """Stop watching and end the engine's thread (streams still carried end with it)."""
        self.loop.remove_reader(self.engine.notify_fd)
        self.engine.shutdown()
        for legs in self.carried.values():
            legs.released.set()
            legs.ended.set()
        self.carried.clear()
