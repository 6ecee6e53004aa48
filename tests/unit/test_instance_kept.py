"""A kept claim's wait in the instance (aube.instance.handoff_threads.Kept), over real socket pairs: released,
superseded by the next stream (also when that stream came before the wait began), or its proxy gone."""

from __future__ import annotations

import socket
import threading

from aube.instance.handoff_threads import Kept


def waiting(kept: Kept, conn: socket.socket, stream: int) -> tuple[threading.Thread, list[bool]]:
    outcome: list[bool] = []
    thread = threading.Thread(target=lambda: outcome.append(kept.hold(conn, stream)))
    thread.start()
    return thread, outcome


def test_released_by_the_proxy() -> None:
    kept = Kept()
    instance, proxy = socket.socketpair()
    with instance, proxy:
        thread, outcome = waiting(kept, instance, kept.supersede())
        proxy.sendall(b'{"released": true}\n')
        thread.join(10)
        assert outcome == [True]


def test_the_proxy_gone_without_a_word_is_not_a_release() -> None:
    kept = Kept()
    instance, proxy = socket.socketpair()
    with instance:
        thread, outcome = waiting(kept, instance, kept.supersede())
        proxy.sendall(b'{"beat": true}\n')  # anything but the release is waited past
        proxy.close()
        thread.join(10)
        assert outcome == [False]


def test_the_next_stream_ends_the_wait_quietly() -> None:
    kept = Kept()
    instance, proxy = socket.socketpair()
    with instance, proxy:
        thread, outcome = waiting(kept, instance, kept.supersede())
        while kept._conn is None:  # until the wait has begun (else the stream would end it at once: next test)
            threading.Event().wait(0.01)
        kept.supersede()
        proxy.settimeout(10)
        thread.join(10)
        assert outcome == [True]
        assert proxy.recv(1) == b""  # the old connection was ended here


def test_a_next_stream_taken_before_the_wait_began_ends_it_at_once() -> None:
    """The proxy may offer the next stream before the last one's thread has read the ack and begun to wait."""
    kept = Kept()
    first = kept.supersede()
    kept.supersede()  # the next stream, taken first
    instance, proxy = socket.socketpair()
    with instance, proxy:
        assert kept.hold(instance, first) is True


def test_the_next_streams_wait_beginning_first_neither_ends_it_nor_counts_as_a_release() -> None:
    """Streams are short: the next stream can be taken, end and begin its own wait before the last one's thread
    wakes from the end of its connection. That thread must still see it was superseded (the instance stays), and
    must not undo the next stream's wait (whose proxy may still vanish)."""
    kept = Kept()
    one, proxy_one = socket.socketpair()
    two, proxy_two = socket.socketpair()
    with one, proxy_one, two, proxy_two:
        first, first_outcome = waiting(kept, one, kept.supersede())
        while kept._conn is None:
            threading.Event().wait(0.01)
        with kept._lock:  # the first thread cannot look until the next stream's wait has begun
            second_number = kept._taken + 1
            kept._taken = second_number
            kept._conn.shutdown(socket.SHUT_RDWR)
            kept._conn = two
        first.join(10)
        assert first_outcome == [True]
        assert kept._conn is two  # still the second stream's wait
        second, second_outcome = waiting(kept, two, second_number)
        proxy_two.close()  # the proxy dies while the second one is kept
        second.join(10)
        assert second_outcome == [False]
