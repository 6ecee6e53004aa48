"""The operator endpoint of the control plane and the reaper: `/_aube/metrics` and `/_aube/health` over plain HTTP on
the service's operator address (loopback by default), and nothing else.

The metrics name every function, so this listener is never public: it binds `operator_host` (127.0.0.1 unless the
operator says otherwise), and instances cannot reach the host's loopback (docs/security.md, "Operator endpoints").
One request per connection, answered and closed: a scraper needs no more. The answer to a request head is the pure
`answer`; `serve` only pumps bytes. Port 0 binds a free port, which `task_status.started` reports.

Against DNS rebinding (a web page whose own name resolves to 127.0.0.1, read by a browser on the operator's machine)
metrics answer only a Host that is an address, `localhost` or the operator host's own name (`host_allowed`; the
proxy's metrics and dashboard use it too). At most MAX_CONNECTIONS are served at once; more are closed at once, so
idle connections (each may take HEAD_TIMEOUT + SEND_TIMEOUT) cannot use up the service's descriptors.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from functools import partial

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskStatus

from aube.shared import names
from aube.shared.errors import InvalidRequest
from aube.shared.metrics import CONTENT_TYPE

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 8 * 1024
HEAD_TIMEOUT = 5.0  # seconds a client has to send its request head
SEND_TIMEOUT = 10.0
MAX_CONNECTIONS = 64

_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
}


def response(
    status: int, body: str, content_type: str = "text/plain; charset=utf-8", *, head_only: bool = False
) -> bytes:
    data = body.encode()
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(data)}",
        "Connection: close",
    ]
    if status == 405:
        lines.append("Allow: GET, HEAD")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else data)


def host_allowed(host_header: str | None, operator_host: str) -> bool:
    """Whether a request's Host names this listener by address, as `localhost`, or as the configured operator host."""
    if not host_header:
        return False
    host = host_header.strip().lower()
    if host.startswith("["):  # [IPv6]:port
        host = host[1 : host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return host in ("localhost", operator_host.lower())


def _host_header(head: bytes) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"host":
            return value.strip().decode("latin-1")
    return None


def answer(head: bytes, render: Callable[[], str], operator_host: str = "127.0.0.1") -> bytes:
    """The whole response to one request head (its bytes up to the blank line)."""
    request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return response(400, "bad request\n")
    method, target, _ = parts
    path = target.split("?", 1)[0]
    if path not in (names.PATH_METRICS, names.PATH_HEALTH):
        return response(404, "not found\n")
    if method not in ("GET", "HEAD"):
        return response(405, "method not allowed\n")
    head_only = method == "HEAD"
    if path == names.PATH_HEALTH:
        return response(200, "ok\n", head_only=head_only)
    if not host_allowed(_host_header(head), operator_host):
        return response(403, "metrics answer only by address, localhost or the operator host's name\n")
    return response(200, render(), CONTENT_TYPE, head_only=head_only)


async def serve(
    host: str,
    port: int,
    render: Callable[[], str],
    setting: str,
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on host:port and answer until cancelled; `task_status.started(port)` with the port bound. `setting`
    names the variable that chose the port, for the message when it cannot be bound."""
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as e:
        raise InvalidRequest(
            f"cannot serve /_aube/metrics on {host}:{port}: {e.strerror or e} (another process holds the port? "
            f"choose another with {setting}, or turn the endpoint off with {setting}=off)"
        ) from e
    async with listener:
        bound = int(listener.extra(SocketAttribute.local_port))
        task_status.started(bound)
        await listener.serve(partial(_connection, render, host, anyio.CapacityLimiter(MAX_CONNECTIONS)))


async def _connection(
    render: Callable[[], str], operator_host: str, limiter: anyio.CapacityLimiter, stream: SocketStream
) -> None:
    async with stream:
        try:
            limiter.acquire_nowait()
        except anyio.WouldBlock:
            return  # closed at once: MAX_CONNECTIONS are being served
        try:
            head = await _read_head(stream)
            reply = response(400, "request head too large\n") if head is None else answer(head, render, operator_host)
            with anyio.fail_after(SEND_TIMEOUT):
                await stream.send(reply)
        except TimeoutError:
            with anyio.move_on_after(1):
                await stream.send(response(408, "request head too slow\n"))
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # the scraper went away
        except Exception:  # a bug in one request must not end the listener (listener.serve would re-raise it)
            log.exception("operator request failed")
        finally:
            limiter.release()


async def _read_head(stream: SocketStream) -> bytes | None:
    """The request head up to its blank line; None when it exceeds MAX_HEAD_BYTES. TimeoutError when too slow."""
    buffer = b""
    with anyio.fail_after(HEAD_TIMEOUT):
        while b"\r\n\r\n" not in buffer:
            if len(buffer) > MAX_HEAD_BYTES:
                return None
            buffer += await stream.receive(4096)
    return buffer.split(b"\r\n\r\n", 1)[0]
