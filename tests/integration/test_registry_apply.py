"""`Registry.apply`, the one compare-and-set loop of the instance lifecycle, against a real nats-server.

A write that times out is the case that matters (reliability finding 3): the timeout is injected at the client's
edge, either before the write leaves (it never lands) or after the server took it (it landed), because the two
cannot be told apart from the outside; the server, the revisions and the fence are real.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import msgspec
import nats
import pytest
from nats.js.errors import KeyWrongLastSequenceError

from aube.shared import instance_lifecycle as lifecycle
from aube.shared.natsserver import LocalNatsServer
from aube.shared.registry import InstanceEntry, NotWritten, Registry, Unknown, Written
from aube.shared.schemas import InstanceRecord, encode

pytestmark = pytest.mark.anyio

KEY = "f.0"


def record(**kw: object) -> InstanceRecord:
    base: dict[str, object] = dict(
        function="f", slot=0, instance_id="i0", version=1, state="free", runtime="process", owner="o", address="a:1"
    )
    base.update(kw)
    return msgspec.convert(base, InstanceRecord)


@pytest.fixture
async def registry(nats_server: LocalNatsServer) -> AsyncIterator[Registry]:
    nc = await nats.connect(nats_server.url)
    try:
        reg = await Registry.open(nc.jetstream())
        for entry in await reg.instances():
            await reg.delete_instance(entry.key)
        yield reg
    finally:
        await nc.close()


async def entry_now(registry: Registry) -> InstanceEntry:
    got = await registry.get_instance(KEY)
    assert got is not None
    return got


async def test_a_transition_is_written_at_the_revision_it_was_decided_on(registry: Registry) -> None:
    rev = await registry.create_instance(record())
    assert rev is not None
    claim = partial(lifecycle.claim, proxy_id="p1", now=5.0)
    outcome = await registry.apply(KEY, claim, entry=InstanceEntry(KEY, rev, record()), attempts=1)
    assert isinstance(outcome, Written)
    assert (await entry_now(registry)) == outcome.entry
    # The same decision made on the old revision now loses, and a claim of a busy instance is refused outright.
    stale = await registry.apply(KEY, claim, entry=InstanceEntry(KEY, rev, record()), attempts=1)
    assert isinstance(stale, NotWritten) and "another writer" in stale.why
    refused = await registry.apply(KEY, partial(lifecycle.claim, proxy_id="p2", now=6.0))
    assert isinstance(refused, NotWritten) and "not allowed from busy" in refused.why
    assert (await entry_now(registry)).record.claimed_by == "p1"


async def test_a_lost_race_is_decided_again_on_a_fresh_read(registry: Registry) -> None:
    rev = await registry.create_instance(record())
    assert rev is not None
    stale = InstanceEntry(KEY, rev, record())
    await registry.update_instance(rev, record(retire=True))  # the control plane retires it meanwhile
    outcome = await registry.apply(KEY, partial(lifecycle.drain), entry=stale)
    assert isinstance(outcome, Written)
    assert outcome.entry.record.state == "draining" and outcome.entry.record.retire  # built from the fresh read
    # Gone, or another instance in the slot: nothing written.
    await registry.delete_instance(KEY)
    assert await registry.apply(KEY, lifecycle.drain) == NotWritten(None, "the entry is gone")
    await registry.create_instance(record(instance_id="i1"))
    other = await registry.apply(KEY, partial(lifecycle.drain, instance_id="i0"))
    assert isinstance(other, NotWritten) and "now holds instance i1" in other.why


def fail_update(registry: Registry, *, after_sending: bool, times: int = 1) -> list[tuple[Any, ...]]:
    """Make the next `times` instance updates time out, before or after the server got them."""
    real = registry.instances_kv.update
    calls: list[tuple[Any, ...]] = []

    async def update(key: str, value: bytes, last: int | None = None) -> int:
        calls.append((key, value, last))
        if len(calls) <= times:
            if after_sending:
                await real(key, value, last=last)
            raise TimeoutError("injected: no answer from JetStream")
        return await real(key, value, last=last)

    registry.instances_kv.update = update  # type: ignore[method-assign]
    return calls


async def test_a_timed_out_claim_that_landed_counts_as_won(registry: Registry) -> None:
    rev = await registry.create_instance(record())
    assert rev is not None
    fail_update(registry, after_sending=True)
    outcome = await registry.apply(KEY, partial(lifecycle.claim, proxy_id="p1", now=5.0), attempts=1)
    assert isinstance(outcome, Written)
    assert outcome.entry.record.claimed_by == "p1" and outcome.entry.revision > rev


async def test_a_timed_out_claim_that_did_not_land_is_fenced_so_it_never_lands_later(registry: Registry) -> None:
    rev = await registry.create_instance(record())
    assert rev is not None
    calls = fail_update(registry, after_sending=False)
    outcome = await registry.apply(KEY, partial(lifecycle.claim, proxy_id="p1", now=5.0), attempts=1)
    assert isinstance(outcome, NotWritten) and "fenced" in outcome.why
    after = await entry_now(registry)
    assert after.record == record() and after.revision > rev  # unchanged, at a new revision
    # The lost write, delivered late (as nats-py does with what it buffered during a reconnect), cannot land.
    key, value, last = calls[0]
    assert last == rev
    with pytest.raises(KeyWrongLastSequenceError):
        await registry.instances_kv.update(key, value, last=last)
    assert (await entry_now(registry)).record.state == "free"


async def test_when_the_registry_stays_silent_the_outcome_is_unknown(registry: Registry) -> None:
    rev = await registry.create_instance(record())
    assert rev is not None
    fail_update(registry, after_sending=False)

    async def silent_get(key: str) -> None:
        raise TimeoutError("injected: no answer")

    registry.get_instance = silent_get  # type: ignore[assignment,method-assign]
    claim = partial(lifecycle.claim, proxy_id="p1", now=5.0)
    outcome = await registry.apply(KEY, claim, entry=InstanceEntry(KEY, rev, record()), attempts=1)
    assert isinstance(outcome, Unknown)
    assert outcome.record == lifecycle.claim(record(), "p1", 5.0)  # what to settle later


async def test_a_caller_that_settles_later_gets_unknown_at_once_with_no_read_and_no_fence(registry: Registry) -> None:
    """The proxy's claims: a timed-out write is left to its unsettled book, not learnt while a client waits."""
    rev = await registry.create_instance(record())
    assert rev is not None
    calls = fail_update(registry, after_sending=False)
    reads: list[str] = []
    real_get = registry.get_instance

    async def counted_get(key: str) -> InstanceEntry | None:
        reads.append(key)
        return await real_get(key)

    registry.get_instance = counted_get  # type: ignore[method-assign]
    claim = partial(lifecycle.claim, proxy_id="p1", now=5.0)
    entry = InstanceEntry(KEY, rev, record())
    outcome = await registry.apply(KEY, claim, entry=entry, attempts=2, learn_outcome=False)
    assert isinstance(outcome, Unknown) and outcome.revision == rev
    assert outcome.record == lifecycle.claim(record(), "p1", 5.0)
    assert reads == [] and len(calls) == 1  # one write, nothing read back, nothing fenced
    assert (await entry_now(registry)).revision == rev


async def test_a_fence_that_meets_the_late_write_itself_counts_it_as_won(registry: Registry) -> None:
    """The timed-out write lands between the re-read and the fence: the fence loses, the claim is seen as won."""
    rev = await registry.create_instance(record())
    assert rev is not None
    real_update = registry.instances_kv.update
    claimed = lifecycle.claim(record(), "p1", 5.0)
    state = {"calls": 0}

    async def update(key: str, value: bytes, last: int | None = None) -> int:
        state["calls"] += 1
        if state["calls"] == 1:
            raise TimeoutError("injected")
        if state["calls"] == 2:  # the fence: the late write lands just before it
            await real_update(key, encode(claimed), last=last)
        return await real_update(key, value, last=last)

    registry.instances_kv.update = update  # type: ignore[method-assign]
    outcome = await registry.apply(KEY, partial(lifecycle.claim, proxy_id="p1", now=5.0), attempts=1)
    assert isinstance(outcome, Written) and outcome.entry.record == claimed


async def test_a_fence_refused_while_the_entry_has_not_moved_leaves_the_outcome_unknown(registry: Registry) -> None:
    """The fence is refused but a read shows the entry unchanged: a write is pending in JetStream, not committed
    yet, and may still land (on a 3-node cluster that lost 2 nodes, the leader refused the fence because of the
    timed-out write it held, which landed once a node came back: tests/faults/test_replicated_state.py). Injected
    here at the client's edge: the timed-out write is held back and the fence refused as the leader refused it."""
    rev = await registry.create_instance(record())
    assert rev is not None
    real_update = registry.instances_kv.update
    held: list[tuple[str, bytes, int | None]] = []

    async def update(key: str, value: bytes, last: int | None = None) -> int:
        if not held:
            held.append((key, value, last))  # accepted by a leader without quorum: no answer, not committed
            raise TimeoutError("injected: no answer from JetStream")
        raise KeyWrongLastSequenceError(description="wrong last sequence: pending write")

    registry.instances_kv.update = update  # type: ignore[method-assign]
    claim = partial(lifecycle.claim, proxy_id="p1", now=5.0)
    outcome = await registry.apply(KEY, claim, attempts=1)
    assert isinstance(outcome, Unknown), outcome  # not NotWritten: the held write may still land
    key, value, last = held[0]
    await real_update(key, value, last=last)  # the quorum is back: it lands
    assert (await entry_now(registry)).record == outcome.record


async def test_unknown_claims_are_settled_each_one_even_several_on_one_key(registry: Registry) -> None:
    """A client retrying through an outage leaves several unknown claims on one key: the one that landed late is
    released, and one that has not landed yet is fenced so it never does (reliability finding 3)."""
    from aube.proxy.unsettled import Pending, Unsettled

    rev = await registry.create_instance(record())
    assert rev is not None
    first = lifecycle.claim(record(), "p1", 5.0)
    second = lifecycle.claim(record(), "p1", 6.0)
    unsettled = Unsettled()
    unsettled.add(KEY, first, used=False, revision=rev)
    unsettled.add(KEY, second, used=False, revision=rev)
    assert len(unsettled.pending) == 2
    # The first claim lands late; the second never will.
    await registry.instances_kv.update(KEY, encode(first), last=rev)
    settled: list[Pending] = []

    async def settle(pending: Pending, revision: int, current: InstanceRecord) -> None:
        settled.append(pending)
        outcome = await registry.apply(KEY, partial(lifecycle.release, fn=None, now=7.0, by="p1"))
        assert isinstance(outcome, Written)

    await unsettled.settle_once(registry, set(), settle)
    assert [p.claim.claimed_at for p in settled] == [5.0]
    assert unsettled.pending == {}
    assert (await entry_now(registry)).record.state == "draining"  # released (no function record: drained)


async def test_a_pending_claim_that_has_not_landed_is_fenced(registry: Registry) -> None:
    from aube.proxy.unsettled import Pending, Unsettled

    rev = await registry.create_instance(record())
    assert rev is not None
    claim = lifecycle.claim(record(), "p1", 5.0)
    unsettled = Unsettled()
    unsettled.add(KEY, claim, used=False, revision=rev)

    async def settle(pending: Pending, revision: int, current: InstanceRecord) -> None:
        raise AssertionError("nothing landed: nothing to settle")

    await unsettled.settle_once(registry, set(), settle)
    assert unsettled.pending == {}
    with pytest.raises(KeyWrongLastSequenceError):  # the late write, replayed now, cannot land
        await registry.instances_kv.update(KEY, encode(claim), last=rev)
    assert (await entry_now(registry)).record.state == "free"
