"""`aube connect`'s pure parts: URLs, what it prints, and the handshake options (the token's documented form)."""

from __future__ import annotations

import os

from aube.cli import connect
from aube.cli.main import parser


def test_stream_url_and_the_default_base() -> None:
    assert connect.stream_url("ws://localhost:8093/", "rev") == "ws://localhost:8093/rev"
    assert connect.DEFAULT_PUBLIC_URL == "ws://localhost:8093"


def test_refusal_names_status_and_body() -> None:
    text = connect.refusal_text(404, "Not Found", b"unknown function 'nope'\n")
    assert text == "error: refused: HTTP 404 Not Found: unknown function 'nope'"
    busy = connect.refusal_text(503, "Service Unavailable", b"no instance\nin time\n", "1")
    assert busy == "error: refused: HTTP 503 Service Unavailable: no instance in time (Retry-After: 1 s)"
    assert connect.refusal_text(400, "Bad Request", b"") == "error: refused: HTTP 400 Bad Request"


def test_messages_and_close() -> None:
    assert connect.message_text("olleh") == "olleh"
    assert connect.message_text(b"\x00\xff") == "(binary) 00ff"
    assert connect.close_text(1000, "") == "closed: 1000 (OK)"
    assert connect.close_text(1011, "function raised") == "closed: 1011 (internal error) function raised"


def test_token_goes_in_the_authorization_header_and_subprotocols_in_order() -> None:
    options = connect.handshake_options("s3cret", ["chat.v2", "chat.v1"])
    assert options["additional_headers"] == {"Authorization": "Bearer s3cret"}
    assert options["subprotocols"] == ["chat.v2", "chat.v1"]
    assert options["ping_interval"] is None
    plain = connect.handshake_options("", [])
    assert plain["additional_headers"] is None and "subprotocols" not in plain


def test_arguments() -> None:
    args = parser().parse_args(["connect", "rev", "--subprotocol", "a", "--subprotocol", "b", "--binary"])
    assert (args.name, args.subprotocol, args.binary, args.linger) == ("rev", ["a", "b"], True, 2.0)


def test_stdin_lines_keep_empty_lines_and_end_with_none() -> None:
    read, write = os.pipe()
    os.write(write, b"a\n\nb\r\nc")
    os.close(write)
    seen: list[bytes | None] = []
    try:
        connect.read_lines(read, lambda line: seen.append(line) is None)
    finally:
        os.close(read)
    assert seen == [b"a", b"", b"b", b"c", None]
