"""The waiting line of a function: first come, first served, one offer per free instance (pure bookkeeping)."""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from aube.proxy import handshake
from aube.proxy.waiting import WaitingClients
from aube.shared.registry import InstanceEntry
from aube.shared.schemas import InstanceRecord

pytestmark = pytest.mark.anyio


def entry(slot: int) -> InstanceEntry:
    rec = InstanceRecord(
        function="f", slot=slot, instance_id=f"i{slot}", version=1, state="free", runtime="process", owner="o"
    )
    return InstanceEntry(f"f.{slot}", slot + 1, rec)


async def test_each_free_instance_goes_to_one_client_the_longest_waiting() -> None:
    line = WaitingClients()
    with ExitStack() as stack:
        first, second, third = (stack.enter_context(line.join("f")) for _ in range(3))
        assert line.count("f") == 3
        assert line.dispatch("f", [entry(0)]) == 1
        assert (first.offer, second.offer, third.offer) == (entry(0), None, None)
        assert first.offered.is_set() and not second.offered.is_set()
        # Dispatching again offers nothing new: the instance is promised, and the others wait for another one.
        assert line.dispatch("f", [entry(0)]) == 0
        assert line.dispatch("f", [entry(0), entry(1)]) == 1
        assert second.offer == entry(1) and third.offer is None


async def test_an_instance_being_tried_is_offered_to_nobody_else_until_the_attempt_ends() -> None:
    line = WaitingClients()
    with line.join("f") as first, line.join("f") as second:
        line.dispatch("f", [entry(0)])
        assert first.take() == entry(0)
        assert not first.offered.is_set()
        assert line.dispatch("f", [entry(0)]) == 0  # first is trying it
        line.tried(first)  # lost the race, say: the instance (if still free) may be offered again, to the head
        assert line.dispatch("f", [entry(0)]) == 1
        assert first.offer == entry(0) and second.offer is None


async def test_a_client_leaving_gives_its_offer_back() -> None:
    line = WaitingClients()
    with line.join("f") as second_in_line:
        with line.join("f") as leaving:
            pass  # joined after: the first must get the next instance
        with line.join("f") as first:
            pass
        assert line.count("f") == 1
        line.dispatch("f", [entry(0)])
        assert second_in_line.offer == entry(0)
        assert leaving.offer is None and first.offer is None
    assert line.count("f") == 0 and line.functions() == []
    with line.join("f") as gone:
        line.dispatch("f", [entry(0)])
        assert gone.offer == entry(0)
    with line.join("f") as later:
        assert line.dispatch("f", [entry(0)]) == 1 and later.offer == entry(0)  # nothing left promised to `gone`


async def test_functions_have_separate_lines() -> None:
    line = WaitingClients()
    with line.join("f") as f_waiter, line.join("g") as g_waiter:
        assert sorted(line.functions()) == ["f", "g"]
        line.dispatch("g", [entry(0)])
        assert g_waiter.offer == entry(0) and f_waiter.offer is None


def test_instance_answers() -> None:
    ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
    busy = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 3\r\n\r\nbusy"
    refused = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
    assert handshake.instance_answer(ok) == "upgraded"
    assert handshake.instance_answer(busy) == "busy"
    assert handshake.instance_answer(refused) == "refused"
    assert handshake.instance_answer(b"HTTP/1.1 101 Switching") == "broken"  # no complete head
    assert handshake.instance_answer(b"SSH-2.0-OpenSSH\r\n\r\n") == "broken"
    assert handshake.instance_answer(b"") == "broken"
