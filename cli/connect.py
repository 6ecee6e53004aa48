"""`aube connect <name>`: an interactive client of a function's stream.

Each line read from stdin is sent as one message (text, or binary with --binary); every message received is printed
on stdout (text as it is, binary as `(binary) <hex>`, as `python -m websockets` does). What is not a message goes
to stderr: the opening, a refused handshake with its HTTP status and body (the platform's reason), and the close code
and reason when the stream ends.

When stdin ends, the client keeps listening until the function has been quiet for `--linger` seconds, then closes
with 1000: closing at once would cut the replies to the last lines still on their way (`echo hi | aube connect x`).

Exit status: 0 when the stream closed with 1000; 1 for a refused or failed handshake, any other close code, or a
connection lost; 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.frames import Close
from websockets.typing import Subprotocol

from aube.cli.terminal import printable
from aube.shared import names
from aube.shared.bus import request
from aube.shared.credentials import redact
from aube.shared.errors import AubeError
from aube.shared.schemas import ListReply, ListRequest
from aube.shared.settings import ControlPlaneSettings

# The base URL a platform gives its streams unless its operator sets AUBE_PUBLIC_URL (the control plane's default).
DEFAULT_PUBLIC_URL: str = next(
    f.default for f in msgspec.structs.fields(ControlPlaneSettings) if f.name == "public_url"
)
# The proxy keeps a client waiting up to AUBE_CLAIM_TIMEOUT_MAX (60 s) while instances start: wait longer than that.
OPEN_TIMEOUT = 90.0
# Messages from a function are not limited by the platform (its clients' limits apply); this client's.
MAX_MESSAGE = 64 * 1024 * 1024
READ_CHUNK = 64 * 1024


def stream_url(base: str, name: str) -> str:
    """The stream URL of function `name` behind the proxy base URL `base` (ws://host:port)."""
    return f"{base.rstrip('/')}/{name}"


def refusal_text(status: int, reason_phrase: str, body: bytes | bytearray, retry_after: str | None = None) -> str:
    """The one line `aube connect` prints for a refused handshake: the status and the platform's reason (the body)."""
    text = printable(body.decode("utf-8", errors="replace").strip())
    line = f"error: refused: HTTP {status} {reason_phrase}".rstrip()
    if text:
        line += f": {' '.join(text.splitlines())}"
    if retry_after:
        line += f" (Retry-After: {retry_after} s)"
    return printable(line)  # the status line and headers come from the function's instance too


def close_text(code: int, reason: str) -> str:
    return f"closed: {Close(code, printable(reason))}"


def message_text(message: str | bytes) -> str:
    return printable(message) if isinstance(message, str) else f"(binary) {message.hex()}"


def read_lines(fd: int, on_line: Callable[[bytes | None], bool]) -> None:
    """Read `fd` with os.read (not sys.stdin: a daemon thread blocked in a buffered reader can abort the
    interpreter's exit) and hand over each line without its line ending (an empty line is an empty message), then
    None for the end. `on_line` returns False to stop."""
    pending = b""
    while True:
        try:
            chunk = os.read(fd, READ_CHUNK)
        except OSError:
            chunk = b""
        if not chunk:
            if pending:
                on_line(pending)
            on_line(None)
            return
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if not on_line(line.removesuffix(b"\r")):
                return


def start_stdin_reader(send: MemoryObjectSendStream[bytes]) -> None:
    """A daemon thread (it may block in a read forever) feeding stdin's lines into `send`, then closing it."""
    loop = asyncio.get_running_loop()

    def on_line(line: bytes | None) -> bool:
        try:
            if line is not None:
                asyncio.run_coroutine_threadsafe(send.send(line), loop).result()
                return True
            loop.call_soon_threadsafe(send.close)
        except (RuntimeError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the client has ended (its loop is gone or it no longer reads)
        return False

    threading.Thread(target=read_lines, args=(0, on_line), name="stdin", daemon=True).start()


class Session:
    """One open stream: stdin's lines out, messages in, and the close when stdin has ended and the function is
    quiet for `linger` seconds."""

    def __init__(self, ws: ClientConnection, *, binary: bool, linger: float) -> None:
        self.ws = ws
        self.binary = binary
        self.linger = linger
        self.stdin_ended = False
        # Once stdin has ended: the wait for the function to be quiet, pushed back by every message received.
        self.quiet = anyio.CancelScope()

    def _quiet_for_linger(self) -> None:
        self.quiet.deadline = anyio.current_time() + self.linger

    async def receive(self) -> None:
        try:
            async for message in self.ws:
                if self.stdin_ended:
                    self._quiet_for_linger()
                print(message_text(message), flush=True)
        except ConnectionClosed:
            pass  # reported from the connection's close code

    async def send(self, lines: MemoryObjectReceiveStream[bytes]) -> None:
        try:
            async with lines:
                async for line in lines:
                    await self.ws.send(line if self.binary else line.decode("utf-8", errors="replace"))
            self.stdin_ended = True
            self._quiet_for_linger()
            with self.quiet:
                await anyio.sleep_forever()
            await self.ws.close()
        except ConnectionClosed:
            pass

    async def run(self) -> int:
        send, lines = anyio.create_memory_object_stream[bytes](16)
        start_stdin_reader(send)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.send, lines)
            await self.receive()
            tg.cancel_scope.cancel()  # the stream is over: stop sending (or lingering)
        code = self.ws.close_code if self.ws.close_code is not None else 1006
        print(close_text(code, self.ws.close_reason or ""), file=sys.stderr, flush=True)
        return 0 if code == 1000 else 1


def handshake_options(token: str, subprotocols: Sequence[str]) -> dict[str, Any]:
    """websockets `connect` keyword arguments: the token as `Authorization: Bearer` (docs/contract.md), the offered
    subprotocols, no client pings (the function's ping policy decides; a client's pings would keep a stream from
    its stream_idle_timeout)."""
    options: dict[str, Any] = {
        "open_timeout": OPEN_TIMEOUT,
        "ping_interval": None,
        "max_size": MAX_MESSAGE,
        "additional_headers": {"Authorization": f"Bearer {token}"} if token else None,
    }
    if subprotocols:
        options["subprotocols"] = [Subprotocol(s) for s in subprotocols]
    return options


async def open_session(url: str, args: argparse.Namespace) -> int:
    try:
        async with connect(url, **handshake_options(args.token, args.subprotocol or ())) as ws:
            chosen = f" (subprotocol {ws.subprotocol})" if ws.subprotocol else ""
            print(f"connected to {url}{chosen}", file=sys.stderr, flush=True)
            return await Session(ws, binary=args.binary, linger=args.linger).run()
    except InvalidStatus as e:
        response = e.response
        retry = response.headers.get("Retry-After")
        print(refusal_text(response.status_code, response.reason_phrase, response.body, retry), file=sys.stderr)
    except (InvalidURI, InvalidHandshake, OSError, TimeoutError) as e:
        print(f"error: unavailable: cannot open a stream at {url}: {e}", file=sys.stderr)
    return 1


async def listed_url(args: argparse.Namespace, name: str) -> str | None:
    """The function's stream URL as the platform lists it to this tenant (`aube ls`), or None if it lists no such
    function (a name of another tenant is still a public stream: the caller tries the default URL)."""
    from aube.cli import session  # the credentials search every command shares

    nc = await session.connect(args.nats, getattr(args, "credentials", None), os.environ, Path.cwd())
    try:
        listed = await request(nc, names.SUBJECT_LIST, ListRequest(), ListReply, min(args.timeout, 30.0))
    finally:
        await nc.close()
    return next((f.url for f in listed.functions if f.name == name), None)


def resolve_url(args: argparse.Namespace, name: str) -> str:
    """--url (or $AUBE_PUBLIC_URL), else the URL the platform lists for the function, else the default one."""
    if args.url:
        return stream_url(args.url, name)
    try:
        url = anyio.run(listed_url, args, name)
    except (AubeError, OSError, nats.errors.Error) as e:
        url = None
        print(f"note: the platform at {redact(args.nats)} could not be asked for {name}'s URL: {e}", file=sys.stderr)
    return url or stream_url(DEFAULT_PUBLIC_URL, name)


def connect_main(args: argparse.Namespace) -> int:
    """`aube connect`: validate the name, find its URL, run the session."""
    try:
        url = resolve_url(args, names.validate_name(args.name))
        return anyio.run(open_session, url, args)
    except AubeError as e:
        print(f"error: {e.code}: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def add_parser(sub: Any) -> None:
    """The `connect` subcommand's arguments."""
    c = sub.add_parser("connect", help="open a function's stream: stdin lines out, messages in")
    c.add_argument("name")
    c.add_argument("--binary", action="store_true", help="send each line as a binary message (default: text)")
    c.add_argument(
        "--token",
        default=os.environ.get("AUBE_STREAM_TOKEN", ""),
        help="bearer token for a function with [access] tokens; default: $AUBE_STREAM_TOKEN",
    )
    c.add_argument(
        "--subprotocol", action="append", metavar="P", help="offer subprotocol P (repeat to offer several, in order)"
    )
    c.add_argument(
        "--url",
        default=os.environ.get("AUBE_PUBLIC_URL", ""),
        help="the proxy's base URL, e.g. ws://localhost:8093; default: $AUBE_PUBLIC_URL, else the URL the platform "
        f"lists for the function, else {DEFAULT_PUBLIC_URL}",
    )
    c.add_argument(
        "--linger",
        type=float,
        default=2.0,
        help="seconds to keep listening once stdin has ended and the function is quiet (default 2)",
    )
