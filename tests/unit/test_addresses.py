"""Instance addresses: the two forms, and what a reply may show of them."""

from __future__ import annotations

import pytest

from aube.shared import addresses


def test_tcp_and_unix_forms() -> None:
    assert addresses.parse("127.0.0.1:8080") == addresses.TcpAddress(host="127.0.0.1", port=8080)
    assert addresses.parse("[::1]:9") == addresses.TcpAddress(host="::1", port=9)
    assert addresses.parse("unix:/run/aube/o/i/instance.sock") == addresses.UnixAddress(
        path="/run/aube/o/i/instance.sock"
    )
    assert addresses.unix("/a/b") == "unix:/a/b"


@pytest.mark.parametrize("bad", ["", "host", "host:", ":80", "h:99999", "h:0", "unix:relative", "unix:", "unix:/a\0b"])
def test_bad_addresses(bad: str) -> None:
    with pytest.raises(ValueError, match="address"):
        addresses.parse(bad)


def test_public_hides_host_paths() -> None:
    assert addresses.public("unix:/run/aube/owner/id/instance.sock") == "unix"
    assert addresses.public("127.0.0.1:8080") == "127.0.0.1:8080"


def test_handoff_socket_sits_beside_a_unix_socket_only() -> None:
    assert addresses.handoff_path("unix:/run/aube/o/i/instance.sock") == "/run/aube/o/i/handoff.sock"
    assert addresses.handoff_path("127.0.0.1:8080") is None
