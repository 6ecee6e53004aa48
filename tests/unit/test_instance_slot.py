"""The one-stream slot: claims, pending expiry, health."""

from __future__ import annotations

import threading

from aube.instance.slot import StreamSlot


def busy(slot: StreamSlot) -> bool:
    # Read through a call: mypy would narrow the property across asserts and call the rest unreachable.
    return slot.busy


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_owner_at_a_time() -> None:
    slot = StreamSlot()
    a, b = object(), object()
    assert slot.owner is None
    assert slot.try_claim(a)
    assert slot.try_claim(a)  # idempotent for the holder
    assert not slot.try_claim(b)
    assert busy(slot)
    assert slot.owner is a
    assert slot.start(a)
    assert slot.streams_served == 1
    slot.release(b)  # not the holder: no effect
    assert busy(slot)
    slot.release(a)
    assert not busy(slot)
    assert slot.owner is None
    assert slot.try_claim(b)


def test_pending_claim_expires_but_a_running_stream_does_not() -> None:
    clock = Clock()
    slot = StreamSlot(clock=clock, pending_timeout=10.0)
    a, b = object(), object()
    assert slot.try_claim(a)
    clock.now += 5
    assert not slot.try_claim(b)
    clock.now += 6  # a's handshake never reached its handler
    assert slot.try_claim(b)
    assert slot.start(b)
    assert not slot.start(a)  # the late one lost its claim
    clock.now += 1000
    assert busy(slot)
    assert not slot.try_claim(a)


def test_start_without_claim_takes_a_free_slot() -> None:
    slot = StreamSlot()
    a = object()
    assert slot.start(a)
    assert busy(slot)
    assert not slot.start(object())


def test_health_body() -> None:
    slot = StreamSlot()
    a = object()
    assert slot.health("i-1") == {"status": "ok", "busy": False, "streams_served": 0, "instance": "i-1"}
    slot.try_claim(a)
    slot.start(a)
    assert slot.health("i-1") == {"status": "ok", "busy": True, "streams_served": 1, "instance": "i-1"}
    slot.release(a)
    assert slot.health("i-1")["busy"] is False


def test_a_closed_connection_gives_back_a_pending_claim_only() -> None:
    slot = StreamSlot()
    a, b = object(), object()
    assert slot.try_claim(a)
    slot.abandon(b)  # not the holder: no effect
    assert busy(slot)
    slot.abandon(a)  # its handshake died: no handler will release it
    assert not busy(slot)
    assert slot.try_claim(b) and slot.start(b)
    slot.abandon(b)  # its handler runs (the client left, the function may not have returned): the handler releases
    assert busy(slot)
    assert not slot.start(a)  # the abandoned one's handler, should it start after all, does not get the slot
    slot.release(b)
    assert not busy(slot)


def test_wait_free_returns_when_the_handler_gives_the_slot_back() -> None:
    slot = StreamSlot()
    owner = object()
    assert slot.try_claim(owner) and slot.start(owner)
    assert slot.wait_free(0.01) is False  # its handler still runs
    threading.Timer(0.05, slot.release, args=(owner,)).start()
    assert slot.wait_free(10) is True
    assert slot.wait_free(0) is True


def test_wait_free_counts_an_abandoned_handshake_as_free() -> None:
    slot = StreamSlot()
    owner = object()
    assert slot.try_claim(owner)
    threading.Timer(0.05, slot.abandon, args=(owner,)).start()
    assert slot.wait_free(10) is True
