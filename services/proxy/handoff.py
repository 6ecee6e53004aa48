"""Socket handoff, the proxy's side: passing a client's own TCP socket to a claimed instance on this host.

With `AUBE_HANDOFF=auto` (the default), a claimed instance whose Unix socket folder holds a handoff socket
(`addresses.handoff_path`) is offered the client's socket over it with SCM_RIGHTS, with the bytes already read (the
request head, forwarded as for a relay: X-Forwarded-For and the instance credential added) and the stream's limits.
The instance answers the handshake itself on that socket (the wire and the instance's rules: aube.instance.handoff).
Once it says it took the socket, the proxy closes its transport (no shutdown: the connection lives on in the
instance) and is out of the data path: no byte of the stream passes here. It keeps the control connection open, on
which the instance reports the stream's end; then the claim is released as after a relayed stream, or kept for the
next client with its flag cleared where the relay would keep it (streams.py), and the end acknowledged.

A hung instance: the proxy keeps a duplicate of the client's descriptor (`HandedOff.client`, never read or written)
and, when the function pings (`decisions.ping_bound`), asks the instance for a heartbeat on the control connection
every quarter of the bound (`hung`; it answers only while its stream's server sends, aube.instance.handoff). An
instance silent past the bound is judged hung as a relay judges a silent one: the duplicate is shut down (`cut`),
which ends the client's connection whoever else holds it.

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
import os
import socket
import stat
from dataclasses import dataclass, field
from typing import Literal

import anyio

from aube.instance.handoff import encode_offer
from aube.proxy.relay import ClientSide

log = logging.getLogger(__name__)

MAX_LINE = 4096


@dataclass
class HandedOff:
    """A stream now served by its instance: the control connection on which it reports the end."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    client: socket.socket | None = None  # a duplicate of the client's socket: only ever shut down (`cut`)
    beats: bool = False  # the instance answers heartbeats (one that does not is never judged by them)
    started: float = field(default_factory=anyio.current_time)
    heard: float = field(default_factory=anyio.current_time)  # the instance's last word on the control connection

    async def ended(self) -> str:
        """Wait for the instance's report of the stream's end: why it ended ("instance_gone": the connection broke).
        Heartbeat answers met on the way are noted (`heard`)."""
        try:
            while True:
                line = await self.reader.readline()
                if not line:
                    return "instance_gone"
                said = json.loads(line)
                self.heard = anyio.current_time()
                if not said.get("beat"):
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

    def cut(self) -> None:
        """End the client's connection (the instance is hung): a shutdown ends it for every holder of the socket."""
        if self.client is not None:
            with contextlib.suppress(OSError):
                self.client.shutdown(socket.SHUT_RDWR)

    def end(self, reason: str) -> None:
        """Ask the instance to end the stream (it shuts the client's connection down, then reports the end)."""
        with contextlib.suppress(OSError):
            self.writer.write(json.dumps({"end": reason}).encode() + b"\n")

    async def acknowledge(self) -> bool:
        """The claim is settled: the instance may serve on (without this it exits after its stream). Whether the
        acknowledgement went out (a broken control connection: the instance is gone, or exits without it)."""
        sent = False
        with contextlib.suppress(OSError):
            self.writer.write(b'{"ack": true}\n')
            await self.writer.drain()
            sent = True
        self.close()
        return sent

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
    return HandedOff(reader, writer, client=kept, beats=kept is not None and answer.get("beats") is True)
