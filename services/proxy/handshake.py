"""Sans-I/O handling of a client's HTTP request head: where it ends, what it asks for, and the plain answers.

The proxy reads bytes until `head_end` finds the blank line, then `parse_head` and `route` decide, without any
I/O, whether the request is one of the proxy's own endpoints, a WebSocket upgrade for a function, or something
to refuse with a plain HTTP response before any upgrade. The raw head is forwarded to the instance unchanged
(`forward_head` only adds X-Forwarded-For and the instance credential, after removing any credential header the
client sent), so the handshake is negotiated end to end.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from typing import Literal
from urllib.parse import parse_qs

import msgspec

from aube.shared import names
from aube.shared.errors import InvalidName

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VERSION = re.compile(rb"^HTTP/1\.[01]$")
# Header values: visible ASCII, spaces, tabs and obs-text; no control characters (CR/LF smuggling).
_VALUE = re.compile(rb"^[\t\x20-\x7e\x80-\xff]*$")

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


class RequestHead(msgspec.Struct, frozen=True, kw_only=True):
    method: str
    target: str
    path: str
    headers: dict[str, list[str]]  # lower-case name -> values in order

    def header(self, name: str) -> str | None:
        values = self.headers.get(name)
        return None if not values else ", ".join(values)


class HeadError(msgspec.Struct, frozen=True, kw_only=True):
    """A request head that gets a plain HTTP error; `reason` is the metrics label."""

    status: int
    reason: str
    message: str


class Endpoint(msgspec.Struct, frozen=True, kw_only=True):
    which: Literal["health", "metrics", "dashboard"]


class FunctionTarget(msgspec.Struct, frozen=True, kw_only=True):
    name: str


Route = Endpoint | FunctionTarget | HeadError


def head_end(buf: bytes | bytearray, max_bytes: int) -> int | HeadError | None:
    """Index just past the head's blank line; None while more bytes are needed; an error when it cannot be one.

    The request line is judged as soon as it is complete, so garbage is refused without waiting for a
    timeout or for the size limit.
    """
    end = buf.find(b"\r\n\r\n")
    if end >= 0:
        if end + 4 > max_bytes:
            return HeadError(status=431, reason="head_too_large", message="request head too large")
        return end + 4
    first = buf.find(b"\r\n")
    line = bytes(buf[:first]) if first >= 0 else bytes(buf[:64])
    if first >= 0 and _request_line(line) is None:
        return HeadError(status=400, reason="bad_request", message="malformed request line")
    if first < 0 and not _plausible_prefix(line):
        return HeadError(status=400, reason="bad_request", message="not an HTTP request")
    if len(buf) >= max_bytes:
        return HeadError(status=431, reason="head_too_large", message="request head too large")
    return None


def _plausible_prefix(prefix: bytes) -> bool:
    """An incomplete request line may still become valid: its method part must be a token so far."""
    method = prefix.split(b" ", 1)[0]
    return not method or _TOKEN.match(method) is not None


def _request_line(line: bytes) -> tuple[str, str] | None:
    parts = line.split(b" ")
    if len(parts) != 3:
        return None
    method, target, version = parts
    if not _TOKEN.match(method) or not _VERSION.match(version):
        return None
    if not target.startswith(b"/") or any(c <= 0x20 or c == 0x7F for c in target):
        return None
    return method.decode("ascii"), target.decode("latin-1")


def parse_head(head: bytes) -> RequestHead | HeadError:
    """Parse a complete head (ending with the blank line)."""
    lines = head[:-4].split(b"\r\n") if head.endswith(b"\r\n\r\n") else head.split(b"\r\n")
    parsed = _request_line(lines[0])
    if parsed is None:
        return HeadError(status=400, reason="bad_request", message="malformed request line")
    method, target = parsed
    headers: dict[str, list[str]] = {}
    for raw in lines[1:]:
        name, sep, value = raw.partition(b":")
        # No obs-fold and no whitespace before the colon: both are request smuggling vectors (RFC 9112 5.1-5.2).
        if not sep or not _TOKEN.match(name) or not _VALUE.match(value):
            return HeadError(status=400, reason="bad_request", message="malformed header line")
        headers.setdefault(name.decode("ascii").lower(), []).append(value.strip(b" \t").decode("latin-1"))
    path = target.split("?", 1)[0]
    return RequestHead(method=method, target=target, path=path, headers=headers)


def _tokens(value: str | None) -> set[str]:
    return {t.strip().lower() for t in value.split(",")} if value else set()


def route(head: RequestHead) -> Route:
    """What the request asks for; refusals that need no registry lookup are decided here."""
    if head.path == names.PATH_HEALTH:
        return Endpoint(which="health") if head.method in ("GET", "HEAD") else _not_allowed()
    if head.path == names.PATH_METRICS:
        return Endpoint(which="metrics") if head.method in ("GET", "HEAD") else _not_allowed()
    if head.path == names.PATH_DASHBOARD or head.path.startswith(names.PATH_DASHBOARD + "/"):
        return Endpoint(which="dashboard") if head.method in ("GET", "HEAD") else _not_allowed()
    # The first path segment names the function; the full path and query pass through to the instance.
    name = head.path[1:].split("/", 1)[0]
    try:
        names.validate_name(name)
    except InvalidName as e:
        return HeadError(status=400, reason="invalid_name", message=e.message)
    if head.method != "GET" or "websocket" not in _tokens(head.header("upgrade")):
        return HeadError(status=426, reason="not_upgrade", message=f"{name}: connect with a WebSocket client")
    if "upgrade" not in _tokens(head.header("connection")):
        return HeadError(status=426, reason="not_upgrade", message=f"{name}: connect with a WebSocket client")
    return FunctionTarget(name=name)


ACCESS_TOKEN_PARAM = "access_token"


def authorize(head: RequestHead, tokens_sha256: Sequence[str]) -> HeadError | None:
    """None when the stream may open: a public function, or a bearer token whose SHA-256 is listed.

    The token comes from `Authorization: Bearer <token>` or, for browsers (whose WebSocket API sets no headers),
    the `access_token` query parameter (RFC 6750). The head still reaches the instance unchanged.
    """
    if not tokens_sha256:
        return None
    token = None
    scheme, _, value = (head.header("authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        token = value.strip()
    else:
        query = head.target.partition("?")[2]
        token = next(iter(parse_qs(query).get(ACCESS_TOKEN_PARAM, [])), None)
    if token is not None:
        digest = hashlib.sha256(token.encode()).hexdigest()
        # Compare against every entry, in constant time each: how far a guess matched leaks nothing.
        if sum(hmac.compare_digest(digest, allowed) for allowed in tokens_sha256):
            return None
    return HeadError(status=401, reason="unauthorized", message="this function needs a valid bearer token")


def _not_allowed() -> HeadError:
    return HeadError(status=405, reason="bad_method", message="method not allowed")


_SECRET_HEADER = names.HEADER_INSTANCE_SECRET.lower().encode("ascii")


def forward_head(head: bytes, client_ip: str, secret: str = "") -> bytes:
    """The client's head unchanged, plus one X-Forwarded-For line (a repeated header appends to the list) and the
    instance's credential (when the instance has one).

    Every line the client sent naming the credential header goes, in any spelling of its case: a client can neither
    present a credential of its own nor make the instance see two. `head` is a complete head `parse_head` accepted,
    so each header line is exactly `name:value` with a token for a name.
    """
    lines = head[:-4].split(b"\r\n")
    kept = [lines[0]] + [line for line in lines[1:] if line.partition(b":")[0].lower() != _SECRET_HEADER]
    extra = b"X-Forwarded-For: " + client_ip.encode("ascii", "replace") + b"\r\n"
    if secret:
        extra += names.HEADER_INSTANCE_SECRET.encode("ascii") + b": " + secret.encode("ascii") + b"\r\n"
    return b"\r\n".join(kept) + b"\r\n" + extra + b"\r\n"


def response(
    status: int,
    body: str = "",
    *,
    headers: dict[str, str] | None = None,
    content_type: str = "text/plain; charset=utf-8",
    head_only: bool = False,
) -> bytes:
    """A complete HTTP/1.1 response that ends the connection."""
    payload = body.encode("utf-8")
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(payload)}",
        "Connection: close",
    ]
    lines.extend(f"{k}: {v}" for k, v in (headers or {}).items())
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + payload


def error_response(error: HeadError, *, retry_after: float | None = None) -> bytes:
    headers: dict[str, str] = {}
    if error.status == 426:
        headers = {"Upgrade": "websocket"}
    if error.status == 401:
        headers = {"WWW-Authenticate": 'Bearer realm="aube"'}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    return response(error.status, error.message + "\n", headers=headers)


InstanceAnswer = Literal["upgraded", "busy", "refused", "broken"]


def instance_answer(head: bytes) -> InstanceAnswer:
    """What an instance's response head says: the upgrade happened ("upgraded"), the instance is busy with another
    stream ("busy": its platform server answers 503 before any function code runs, so no function can fake it, and
    the client goes to another instance), it refused this request itself ("refused", e.g. 400 for a subprotocol it
    does not speak: the client gets that answer), or it is no HTTP response at all ("broken")."""
    line, _, _ = bytes(head).partition(b"\r\n")
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit() or b"\r\n\r\n" not in head:
        return "broken"
    status = int(parts[1])
    if status == 101:
        return "upgraded"
    return "busy" if status == 503 else "refused"
