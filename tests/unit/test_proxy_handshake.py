"""Sans-I/O request head handling: limits, parsing, routing, forwarding, responses."""

from __future__ import annotations

import pytest

from aube.proxy import handshake
from aube.proxy.handshake import Endpoint, FunctionTarget, HeadError, RequestHead
from aube.shared import names

UPGRADE = (
    b"GET /reverse?x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: chat, superchat\r\n\r\n"
)


def _parse(raw: bytes) -> RequestHead:
    head = handshake.parse_head(raw)
    assert isinstance(head, RequestHead)
    return head


def test_head_end_needs_more_bytes_then_finds_the_blank_line() -> None:
    assert handshake.head_end(UPGRADE[:10], 16384) is None
    assert handshake.head_end(UPGRADE[:-2], 16384) is None
    assert handshake.head_end(UPGRADE + b"extra", 16384) == len(UPGRADE)


@pytest.mark.parametrize("garbage", [b"\x16\x03\x01\x02\x00\x01", b"\x00\xff garbage\r\n", b"GET / HTTP/9\r\n"])
def test_garbage_is_refused_without_waiting(garbage: bytes) -> None:
    got = handshake.head_end(garbage, 16384)
    assert isinstance(got, HeadError)
    assert got.status == 400


def test_oversized_head_is_431_with_or_without_an_end() -> None:
    big = b"GET /x HTTP/1.1\r\nX-Big: " + b"a" * 100
    got = handshake.head_end(big, 64)
    assert isinstance(got, HeadError)
    assert got.status == 431
    got = handshake.head_end(big + b"\r\n\r\n", 64)
    assert isinstance(got, HeadError)
    assert got.status == 431


def test_parse_keeps_path_query_and_repeated_headers() -> None:
    head = _parse(UPGRADE)
    assert head.method == "GET"
    assert head.target == "/reverse?x=1"
    assert head.path == "/reverse"
    assert head.header("sec-websocket-protocol") == "chat, superchat"


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nX : a\r\n\r\n",
        b"GET http://evil/ HTTP/1.1\r\n\r\n",
    ],
)
def test_malformed_heads_are_400(raw: bytes) -> None:
    got = handshake.parse_head(raw)
    assert isinstance(got, HeadError)
    assert got.status == 400


def test_route_function_upgrade() -> None:
    assert handshake.route(_parse(UPGRADE)) == FunctionTarget(name="reverse")
    sub = UPGRADE.replace(b"/reverse?x=1", b"/reverse/deeper")
    assert handshake.route(_parse(sub)) == FunctionTarget(name="reverse")


def test_route_own_endpoints() -> None:
    assert handshake.route(_parse(b"GET /_aube/health HTTP/1.1\r\n\r\n")) == Endpoint(which="health")
    assert handshake.route(_parse(b"GET /_aube/metrics HTTP/1.1\r\n\r\n")) == Endpoint(which="metrics")


@pytest.mark.parametrize("path", ["/Bad_Name", "/", "/-x", "/a%20b", "/" + "a" * 64])
def test_route_invalid_name_is_400(path: str) -> None:
    got = handshake.route(_parse(UPGRADE.replace(b"/reverse?x=1", path.encode())))
    assert isinstance(got, HeadError)
    assert (got.status, got.reason) == (400, "invalid_name")


def test_route_plain_get_to_a_function_is_426() -> None:
    got = handshake.route(_parse(b"GET /reverse HTTP/1.1\r\nHost: h\r\n\r\n"))
    assert isinstance(got, HeadError)
    assert got.status == 426
    assert b"Upgrade: websocket" in handshake.error_response(got)


def test_forward_head_adds_only_x_forwarded_for() -> None:
    out = handshake.forward_head(UPGRADE, "10.1.2.3")
    assert out.startswith(UPGRADE[:-2])
    assert out.endswith(b"X-Forwarded-For: 10.1.2.3\r\n\r\n")
    assert _parse(out).header("x-forwarded-for") == "10.1.2.3"


def test_error_response_carries_retry_after() -> None:
    err = HeadError(status=503, reason="no_instance", message="none")
    out = handshake.error_response(err, retry_after=2.0)
    assert out.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"\r\nRetry-After: 2\r\n" in out
    assert b"Connection: close" in out


def _head_with(target: str, *extra: bytes) -> handshake.RequestHead:
    raw = b"GET " + target.encode() + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    head = handshake.parse_head(raw + b"".join(extra) + b"\r\n")
    assert isinstance(head, handshake.RequestHead)
    return head


def test_authorize_public_functions_and_bearer_tokens() -> None:
    import hashlib

    digest = hashlib.sha256(b"s3cret").hexdigest()
    assert handshake.authorize(_head_with("/f"), []) is None  # a public function
    assert handshake.authorize(_head_with("/f", b"Authorization: Bearer s3cret\r\n"), [digest]) is None
    assert handshake.authorize(_head_with("/f?x=1&access_token=s3cret"), ["0" * 64, digest]) is None
    for head in (
        _head_with("/f"),
        _head_with("/f", b"Authorization: Bearer wrong\r\n"),
        _head_with("/f", b"Authorization: Basic czNjcmV0\r\n"),
        _head_with("/f?access_token=wrong"),
    ):
        denied = handshake.authorize(head, [digest])
        assert denied is not None
        assert denied.status == 401
    response = handshake.error_response(handshake.authorize(_head_with("/f"), [digest]))  # type: ignore[arg-type]
    assert response.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b"WWW-Authenticate: Bearer" in response


def test_forward_head_presents_the_instance_credential_and_drops_the_clients() -> None:
    forged = (
        b"GET /fn HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"X-Aube-Instance-Secret: forged-1\r\nx-aube-instance-secret: forged-2\r\nX-AUBE-INSTANCE-SECRET:forged-3\r\n"
        b"X-Aube-Instance-Secret-Extra: kept\r\nX_Aube_Instance_Secret: kept-too\r\n\r\n"
    )
    _parse(forged)
    out = handshake.forward_head(forged, "10.1.2.3", "s3cr3t")
    head = _parse(out)
    assert head.headers[names.HEADER_INSTANCE_SECRET.lower()] == ["s3cr3t"]
    assert b"forged" not in out
    assert head.header("x-aube-instance-secret-extra") == "kept"
    assert head.header("x_aube_instance_secret") == "kept-too"
    assert head.header("x-forwarded-for") == "10.1.2.3"
    assert out.startswith(b"GET /fn HTTP/1.1\r\nHost: x\r\n") and out.endswith(b"\r\n\r\n")
    # An instance without a credential (started before it existed) still never sees a client's copy.
    bare = handshake.forward_head(forged, "10.1.2.3")
    assert b"forged" not in bare
    assert names.HEADER_INSTANCE_SECRET.lower() not in _parse(bare).headers


def test_forward_head_of_a_head_without_headers() -> None:
    out = handshake.forward_head(b"GET /fn HTTP/1.1\r\n\r\n", "::1", "k")
    assert out == b"GET /fn HTTP/1.1\r\nX-Forwarded-For: ::1\r\nX-Aube-Instance-Secret: k\r\n\r\n"
