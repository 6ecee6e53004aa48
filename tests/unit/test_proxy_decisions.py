"""Pure claim, release and scale decisions."""

from __future__ import annotations

import msgspec

from aube.proxy import decisions
from aube.proxy.decisions import PoolCounts
from aube.shared import names, records
from aube.shared.registry import InstanceEntry
from aube.shared.schemas import FunctionRecord, InstanceRecord, LimitsSection, Manifest, ScalingSection


def _fn(version: int = 2, *, min_free: int = 1, max_instances: int = 10, fresh: bool = False) -> FunctionRecord:
    scaling = ScalingSection(min_free=min_free, max_instances=max_instances, fresh_per_stream=fresh)
    return FunctionRecord(
        name="f",
        version=version,
        manifest=Manifest(scaling=scaling),
        artifact="x",
        runtime="process",
        created_at=0,
        updated_at=0,
    )


def _slot(slot: int, state: str = "free", version: int = 2, **kw: object) -> InstanceEntry:
    rec = InstanceRecord(
        function="f",
        slot=slot,
        instance_id=f"i{slot}",
        version=version,
        state=state,  # type: ignore[arg-type]
        runtime="process",
        owner="o",
        address=f"127.0.0.1:{9000 + slot}",
    )
    return InstanceEntry(f"f.{slot}", 10 + slot, msgspec.structs.replace(rec, **kw))


def test_only_free_current_unretired_instances_are_candidates() -> None:
    slots = [
        _slot(0),
        _slot(1, state="busy"),
        _slot(2, version=1),
        _slot(3, retire=True),
        _slot(4, address=""),
        _slot(5, state="starting"),
        _slot(6),
    ]
    got = decisions.candidates(_fn(), slots, salt="s")
    assert sorted(s.key for s in got) == ["f.0", "f.6"]
    assert decisions.candidates(_fn(), slots, salt="s", skip=frozenset({"f.0"})) == [slots[6]]
    assert decisions.candidates(msgspec.structs.replace(_fn(), deleting=True), slots, salt="s") == []


def test_candidate_order_depends_on_the_salt() -> None:
    slots = [_slot(i) for i in range(8)]
    orders = {tuple(s.key for s in decisions.candidates(_fn(), slots, salt=str(n))) for n in range(10)}
    assert len(orders) > 1


def test_counts() -> None:
    slots = [_slot(0), _slot(1, state="busy"), _slot(2, state="starting"), _slot(3, version=1), _slot(4, retire=True)]
    assert decisions.counts(_fn(), slots) == PoolCounts(free=1, starting=1, total=5)


def test_scale_count() -> None:
    fn = _fn(min_free=1, max_instances=4)
    assert decisions.scale_count(fn, PoolCounts(free=0, starting=0, total=1), waiting=0) == 1
    assert decisions.scale_count(fn, PoolCounts(free=1, starting=0, total=2), waiting=0) == 0
    assert decisions.scale_count(fn, PoolCounts(free=0, starting=1, total=2), waiting=0) == 0
    assert decisions.scale_count(fn, PoolCounts(free=0, starting=0, total=1), waiting=2) == 3
    assert decisions.scale_count(fn, PoolCounts(free=0, starting=0, total=4), waiting=2) == 0  # at max_instances
    cold = _fn(min_free=0)
    assert decisions.scale_count(cold, PoolCounts(), waiting=0) == 0
    assert decisions.scale_count(cold, PoolCounts(), waiting=1) == 1  # min_free 0: a stream is a cold start


def test_a_scale_intent_holds_its_cooldown_within_what_the_bucket_keeps() -> None:
    intent = decisions.scale_intent("f", "p1", 1000.0, 2.0)
    assert (intent.function, intent.proxy_id, intent.asked_at, intent.expires_at) == ("f", "p1", 1000.0, 1002.0)
    assert intent.in_force(1001.999) and not intent.in_force(1002.0)
    # A cooldown longer than the bucket keeps an intent is cut to it, so every reader trusts the record.
    assert decisions.scale_intent("f", "p1", 1000.0, 1e9).expires_at == 1000.0 + names.SCALE_INTENT_MAX_AGE
    # No cooldown, no window: the next asker is never held back.
    assert not decisions.scale_intent("f", "p1", 1000.0, -5.0).in_force(1000.0)
    for cooldown in (1e9, -5.0, 0.0, 2.0):
        intent = decisions.scale_intent("f", "p1", 1000.0, cooldown)
        assert records.problem("f", intent) is None


def test_the_ping_bound_is_interval_plus_timeout_only_for_an_instance_that_pings() -> None:
    pinging = msgspec.structs.replace(
        _fn(), manifest=Manifest(limits=LimitsSection(ping_interval=1.0, ping_timeout=1.5))
    )
    assert decisions.ping_bound(pinging, _slot(0).record) == 2.5
    assert decisions.ping_bound(_fn(), _slot(0).record) is None  # no ping policy
    assert decisions.ping_bound(pinging, _slot(0, version=1).record) is None  # started under another manifest
    assert decisions.ping_bound(None, _slot(0).record) is None


def test_stream_limits_read_zero_as_unlimited() -> None:
    assert decisions.stream_limits(None) == (None, None)
    assert decisions.stream_limits(_fn()) == (None, None)
    limited = msgspec.structs.replace(
        _fn(), manifest=Manifest(limits=LimitsSection(stream_idle_timeout=30, stream_max_duration=600))
    )
    assert decisions.stream_limits(limited) == (30, 600)


def test_a_handed_off_stream_breaks_a_limit_only_past_the_grace() -> None:
    limits = (10.0, 60.0)
    assert decisions.broken_limit(60.9, 0.0, limits, 1.0) is None  # the instance's turn to close it
    assert decisions.broken_limit(61.0, 0.0, limits, 1.0) == "max_duration"
    assert decisions.broken_limit(5.0, 10.9, limits, 1.0) is None
    assert decisions.broken_limit(5.0, 11.0, limits, 1.0) == "idle_timeout"
    assert decisions.broken_limit(5.0, None, limits, 1.0) is None  # the kernel could not say: no idle judgement
    assert decisions.broken_limit(1e9, 1e9, (None, None), 1.0) is None
    assert decisions.broken_limit(70.0, 70.0, limits, 1.0) == "max_duration"  # the longest first: it always holds
