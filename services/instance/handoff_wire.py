"""Socket handoff's wire: the offer a proxy sends with a client's socket, and the lines both sides say after it.

    proxy -> instance   one offer: a header (">II": parameter length, prefix length), the parameters as JSON
                        (`secret`, `idle_timeout`, `max_duration`, `ack_wait`, `ping_bound`), then the prefix: the
                        bytes the proxy already read (the forwarded request head, which carries the instance
                        credential as in the relay, and whatever followed it). The client's socket rides along with
                        the first bytes.
    instance -> proxy   {"taken": true, "beats": true, "keeps": true} (or taken false: busy), then {"ended": reason,
                        "free": bool}
                        once the connection is closed (`free`: the stream's handler has returned, so the proxy need
                        not ask the instance's health before it settles the claim).
    proxy -> instance   {"beat": true} while the stream lasts (every quarter of `ping_bound`), answered with
                        {"beat": true} while the stream's server is live: it sent the client something within the
                        bound (it pings), or the client leaves our bytes in the send queue. A proxy that hears no
                        answer within the bound judges the instance hung (a stopped process, a blocked event loop).
    proxy -> instance   {"ack": true} once the proxy has released (or otherwise settled) its claim; or, to an instance
                        that said "keeps", {"ack": true, "kept": true}: the proxy keeps its claim, still flagged,
                        for its next client. The instance then holds this connection open until the proxy says
                        {"released": true} (its claim is released), or its next stream is offered (on a new
                        connection: this one is then closed), and exits if the connection ends before either (the
                        proxy is gone, and no one else may account for the flagged claim).

The proxy encodes offers with `encode_offer` (aube.proxy.handoff); the instance's side is aube.instance.handoff.
Only the standard library here: this module ships into every function image with the rest of `aube.instance`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

MAX_LINE = 4096  # a control line's longest
OFFER_TIMEOUT = 5.0  # an offer must arrive whole within this, and a line once begun: the proxy sends each in one go

HEADER = struct.Struct(">II")
MAX_PARAMS = 4096
MAX_PREFIX = 1 << 20


@dataclass(frozen=True)
class Offer:
    secret: str
    prefix: bytes
    idle_timeout: float | None
    max_duration: float | None
    ack_wait: float
    ping_bound: float | None = None  # ping_interval + ping_timeout when this instance pings the client


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


def offer_size(data: bytes | bytearray) -> int:
    """How many bytes the offer starting with `data` has (as far as it may be read), as its header says; the
    header's size while `data` does not hold all of it yet."""
    if len(data) < HEADER.size:
        return HEADER.size
    params_len, prefix_len = HEADER.unpack_from(data)
    return int(HEADER.size + min(params_len, MAX_PARAMS + 1) + min(prefix_len, MAX_PREFIX + 1))


def read_line(conn: socket.socket) -> dict[str, Any] | None:
    """One message of the proxy's; None when it is gone (or said something that is not one)."""
    try:
        conn.settimeout(OFFER_TIMEOUT)
        line = readline(conn)
        said = json.loads(line) if line else None
    except (OSError, ValueError):
        return None
    return said if isinstance(said, dict) else None


def readline(conn: socket.socket) -> bytes:
    """One line, read a byte at a time: nothing after it is taken from the socket (the lines are few and short)."""
    line = bytearray()
    while len(line) < MAX_LINE:
        byte = conn.recv(1)
        if not byte:
            break
        line += byte
        if byte == b"\n":
            break
    return bytes(line)


def say(conn: socket.socket, message: dict[str, object]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def try_say(conn: socket.socket, message: dict[str, object]) -> bool:
    """Say `message`; whether the proxy is still there to hear it."""
    try:
        say(conn, message)
    except OSError:
        return False
    return True


def report_end(conn: socket.socket, report: dict[str, object], wait: float) -> dict[str, Any] | None:
    """Report the stream's end; the proxy's acknowledgement if it came within `wait` ({"ack": true}, with
    "kept": true when it keeps its claim, flagged, for its next client), else None (a heartbeat it sent before it
    heard of the end may come first: skipped)."""
    deadline = time.monotonic() + wait
    try:
        say(conn, report)
        while (left := deadline - time.monotonic()) > 0:
            conn.settimeout(left)
            line = readline(conn)
            said = json.loads(line) if line else None
            if not (isinstance(said, dict) and said.get("beat")):
                return said if isinstance(said, dict) and said.get("ack") is True else None
    except (OSError, ValueError):
        return None
    return None


def released(conn: socket.socket) -> bool:
    """Wait, with no time limit, for the proxy that keeps this instance to say {"released": true}; False when the
    connection ends first (the proxy is gone, or the connection was shut down here: `Kept.supersede`)."""
    try:
        conn.settimeout(None)
        while line := readline(conn):
            said = json.loads(line)
            if isinstance(said, dict) and said.get("released") is True:
                return True
    except (OSError, ValueError):
        return False
    return False
