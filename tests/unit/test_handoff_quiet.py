"""The kernel's count of a TCP connection's quiet time (proxy/handoff.py `quiet_for`), on a real loopback pair: what
the proxy judges a handed-off stream's idle timeout by, since the instance's own count runs beside the function."""

from __future__ import annotations

import socket
import time

from aube.proxy.handoff import quiet_for


def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    return client, accepted


def test_quiet_time_counts_data_either_way_and_restarts_with_each_byte() -> None:
    client, accepted = _pair()
    with client, accepted:
        client.sendall(b"x")
        accepted.recv(1)
        time.sleep(1.0)
        quiet = quiet_for(accepted)
        assert quiet is not None and quiet >= 0.9
        accepted.sendall(b"y")  # sent by this side: counts
        assert (quiet_for(accepted) or 0) < 0.9
        client.recv(1)
        time.sleep(1.0)
        client.sendall(b"z")  # received by this side: counts too
        time.sleep(0.05)
        assert (quiet_for(accepted) or 0) < 0.9
        assert quiet_for(client) is not None


def test_a_duplicate_descriptor_sees_the_same_connection() -> None:
    client, accepted = _pair()
    with client, accepted, socket.socket(fileno=accepted.dup().detach()) as copy:
        client.sendall(b"x")
        time.sleep(1.0)
        quiet = quiet_for(copy)
        assert quiet is not None and quiet >= 0.9


def test_not_a_tcp_socket_is_unknown() -> None:
    left, right = socket.socketpair()
    with left, right:
        assert quiet_for(left) is None
