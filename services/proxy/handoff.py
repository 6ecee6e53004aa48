"""Socket handoff, the proxy's side: passing a client's own TCP socket to a claimed instance on this host.

With `AUBE_HANDOFF=auto` (the default), a claimed instance whose Unix socket folder holds a handoff socket
(`addresses.handoff_path`) is offered the client's socket over it with SCM_RIGHTS, with the bytes already read (the
request head, forwarded as for a relay: X-Forwarded-For and the instance credential added) and the stream's limits.
The instance answers the handshake itself on that socket (the wire and the instance's rules: aube.instance.handoff).
Once it says it took the socket, the proxy closes its transport (no shutdown: the connection lives on in the
instance) and is out of the data path: no byte of the stream passes here. It keeps the control connection open, on
which the instance reports the stream's end; then the claim is released as after a relayed stream, or kept for the
next client where the relay would keep it (streams.py): still flagged, with no write, the instance acknowledged as
kept and holding this connection until the claim is released or used again (docs/handoff.md).

A hung instance: the proxy keeps a duplicate of the client's descriptor (`HandedOff.client`, never read or written)
and, when the function pings (`decisions.ping_bound`), asks the instance for a heartbeat on the control connection
every quarter of the bound (`hung`; it answers only while its stream's server sends, aube.instance.handoff). An
instance silent past the bound is judged hung as a relay judges a silent one: the duplicate is shut down (`cut`),
which ends the client's connection whoever else holds it.

Limits: the instance closes the stream at its idle timeout and longest duration, but it runs the function's code,
which can stop that (it shares the process). So the proxy enforces them too, from what the function cannot touch
(`past_limits`): the time since the handoff, and the client connection's own quiet time as its kernel counts it
(`TCP_INFO`: the last data sent and received). A stream past a limit by `LIMIT_GRACE` (the instance's chance to
close it first) is cut, as a hung instance's is.

`offer` says what came of it: `HandedOff`; "busy" (the instance refused, the socket is still only ours);
"unavailable" (nothing was passed: no handoff socket, or it cannot be reached: the caller relays instead); or
"lost" (the socket was passed but no answer came: the instance may be serving the client, so the proxy lets go of
the client and the caller hands the instance back only once it says its handler is done).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import stat
import struct
from dataclasses import dataclass, field
from typing import Literal

import anyio

from aube.instance.handoff_wire import encode_offer
from aube.proxy import decisions
from aube.proxy.relay import ClientSide

log = logging.getLogger(__name__)

MAX_LINE = 4096
LIMIT_GRACE = 1.0  # past a limit by this much, the proxy cuts a stream its instance did not close
LIMIT_TICK = 0.25  # the idle check samples the kernel's counters at most this often (and a quarter window at least)

# struct tcp_info (linux/tcp.h): tcpi_last_data_sent, tcpi_last_ack_sent, tcpi_last_data_recv, in ms, at byte 44.
_TCP_INFO_LAST_DATA = struct.Struct("=III")
_TCP_INFO_LAST_DATA_AT = 44
_TCP_INFO_LEN = _TCP_INFO_LAST_DATA_AT + _TCP_INFO_LAST_DATA.size


def quiet_for(sock: socket.socket) -> float | None:
    """Seconds since the TCP connection last carried data either way (acknowledgements and keepalive probes do not
    count; WebSocket pings do, as they do in the relay), as the kernel counts it. None if it cannot tell."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except (OSError, AttributeError):
        return None
    if len(info) < _TCP_INFO_LEN:
        return None
    sent, _, received = _TCP_INFO_LAST_DATA.unpack_from(info, _TCP_INFO_LAST_DATA_AT)
    return float(min(sent, received)) / 1000


@dataclass
class HandedOff:
    """A stream now served by its instance: the control connection on which it reports the end."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    client: socket.socket | None = None  # a duplicate of the client's socket: only ever shut down (`cut`)
    limits: tuple[float | None, float | None] = (None, None)  # idle timeout, longest duration (the instance's too)
    beats: bool = False  # the instance answers heartbeats (one that does not is never judged by them)
    keeps: bool = False  # the instance holds a kept claim's control connection (handoff_wire: "kept")
    started: float = field(default_factory=anyio.current_time)
    heard: float = field(default_factory=anyio.current_time)  # the instance's last word on the control connection
    handler_returned: bool = False  # the instance said, with the end, that its stream's handler has returned

    async def ended(self) -> str:
        """Wait for the instance's report of the stream's end: why it ended ("instance_gone": the connection broke),
        and whether its handler returned (`handler_returned`). Heartbeat answers met on the way are noted (`heard`)."""
        try:
            while True:
                line = await self.reader.readline()
                if not line:
                    return "instance_gone"
                said = json.loads(line)
                self.heard = anyio.current_time()
                if not said.get("beat"):
                    self.handler_returned = said.get("free") is True
                    return str(said["ended"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return "instance_gone"

    async def hung(self, bound: float) -> None:
        """Return once the instance has not answered a heartbeat for `bound` seconds (never, for an instance that
        does not answer them). Asks for one every quarter of the bound; `ended` reads the answers."""
        if not self.beats:
            await anyio.sleep_forever()
        while True:
            await anyio.sleep(bound / 4)
            if anyio.current_time() - self.heard >= bound:
                return
            with contextlib.suppress(OSError):
                self.writer.write(b'{"beat": true}\n')

    async def past_limits(self) -> str:
        """Return the limit the stream broke by `LIMIT_GRACE`, judged from the kernel's view of the client's
        connection and the time since the handoff (never without a limit or a copy of the client's socket)."""
        idle, longest = self.limits
        if self.client is None or (idle is None and longest is None):
            await anyio.sleep_forever()
        assert self.client is not None
        while True:
            elapsed = anyio.current_time() - self.started
            limit = decisions.broken_limit(elapsed, quiet_for(self.client), self.limits, LIMIT_GRACE)
            if limit is not None:
                return limit
            next_idle_check = max(idle / 4, LIMIT_TICK) if idle is not None else math.inf
            until_longest = longest + LIMIT_GRACE - elapsed if longest is not None else math.inf
            await anyio.sleep(max(min(next_idle_check, until_longest), 0.01))

    def cut(self) -> None:
        """End the client's connection (the instance is hung): a shutdown ends it for every holder of the socket."""
        if self.client is not None:
            with contextlib.suppress(OSError):
                self.client.shutdown(socket.SHUT_RDWR)

    def end(self, reason: str) -> None:
        """Ask the instance to end the stream (it shuts the client's connection down, then reports the end)."""
        with contextlib.suppress(OSError):
            self.writer.write(json.dumps({"end": reason}).encode() + b"\n")

    async def acknowledge(self, *, kept: bool = False) -> bool:
        """The claim is settled: the instance may serve on (without this it exits after its stream). Whether the
        acknowledgement went out (a broken control connection: the instance is gone, or exits without it).

        `kept`: the claim stays this replica's, flagged, for its next client; the control connection stays open,
        and the instance exits should it end before `release_kept` (this replica died) or the next stream."""
        sent = False
        with contextlib.suppress(OSError):
            self.writer.write(b'{"ack": true, "kept": true}\n' if kept else b'{"ack": true}\n')
            await self.writer.drain()
            sent = True
        if kept and sent:
            self.let_go()
        else:
            self.close()
        return sent

    def release_kept(self) -> None:
        """The kept claim is released (written): the instance serves on, no longer held."""
        with contextlib.suppress(OSError):
            self.writer.write(b'{"released": true}\n')
        self.close()

    def let_go(self) -> None:
        """Close the copy of the client's socket (no shutdown: the instance may still be closing it cleanly)."""
        if self.client is not None:
            self.client.close()
            self.client = None

    def close(self) -> None:
        self.writer.close()
        self.let_go()


Outcome = HandedOff | Literal["busy", "unavailable", "lost"]


def handoff_socket(path: str | None) -> str | None:
    """`path` when it is a Unix socket this process can see (the instance is on this host and takes handoffs)."""
    if path is None:
        return None
    try:
        return path if stat.S_ISSOCK(os.lstat(path).st_mode) else None
    except OSError:
        return None


async def offer(
    client: ClientSide,
    path: str,
    head: bytes,
    head_len: int,
    secret: str,
    limits: tuple[float | None, float | None],
    ack_wait: float,
    timeout: float,
    *,
    ping_bound: float | None = None,
) -> Outcome:
    """Offer the client's socket to the instance listening at `path`; see the module docstring for the outcomes.

    `head`: the forwarded request head, in place of the client's own first `head_len` bytes read. `limits`: the
    stream's idle timeout and longest duration; `ping_bound`: the instance pings, so a client silent that long is
    hung (decisions.ping_bound)."""
    transport = client.transport
    if transport is None or transport.is_closing():
        return "unavailable"
    # Nothing more may be read here: every byte after this belongs to the instance.
    transport.pause_reading()
    wire = encode_offer(secret, head + bytes(client.buffer[head_len:]), limits[0], limits[1], ack_wait, ping_bound)
    loop = asyncio.get_running_loop()
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.setblocking(False)
    try:
        try:
            # A listening Unix socket with room in its backlog takes the connection at once: no trip round the loop.
            control.connect(path)
        except BlockingIOError:
            with anyio.fail_after(timeout):
                await loop.sock_connect(control, path)
        client_fd = transport.get_extra_info("socket").fileno()
        # One sendmsg: the offer is a few KiB on a fresh local connection, which takes it whole.
        sent = socket.send_fds(control, [wire], [client_fd])
    except (OSError, TimeoutError) as e:
        control.close()
        log.warning("handoff to %s unavailable (%s): relaying", path, e)
        return "unavailable"
    try:
        if sent < len(wire):
            await loop.sock_sendall(control, wire[sent:])
        reader, writer = await asyncio.open_unix_connection(sock=control, limit=MAX_LINE)
        with anyio.fail_after(timeout):
            answer = json.loads(await reader.readline())
        taken = bool(answer.get("taken"))
    except (OSError, ValueError, TimeoutError, AttributeError) as e:
        log.warning("handoff to %s got no answer (%s): letting the client go", path, e)
        control.close()
        transport.abort()
        return "lost"
    if not taken:
        writer.close()
        return "busy"
    try:
        kept: socket.socket | None = socket.socket(fileno=os.dup(client_fd))
    except OSError as e:
        log.warning("could not keep a copy of a handed-off client's socket (%s): no heartbeat judgement", e)
        kept = None
    # The instance holds the client's socket: drop the transport without a shutdown (that would end the connection).
    transport.abort()
    beats = kept is not None and answer.get("beats") is True
    return HandedOff(reader, writer, client=kept, limits=limits, beats=beats, keeps=answer.get("keeps") is True)
