"""The reaper's pure decisions: what is reaped, what is kept, which claims and leases are dead."""

from __future__ import annotations

from typing import Any

import msgspec

from aube.reaper.decisions import (
    FAILOVER_GRACE,
    HOST_MEMORY,
    LEASE_MEMORY,
    OVERDUE_GRACE,
    DeleteHost,
    DeleteLease,
    Drain,
    Forget,
    Plan,
    Policy,
    Seen,
    Snapshot,
    plan,
)
from aube.shared.hostbook import HostEntry
from aube.shared.registry import InstanceEntry, LeaseEntry
from aube.shared.schemas import (
    FunctionRecord,
    HostLease,
    InstanceRecord,
    LimitsSection,
    Manifest,
    ProxyLease,
    ScalingSection,
)

NOW = 10_000.0
POLICY = Policy(lease_grace=6.0)


def fn(
    name: str = "echo", *, version: int = 2, min_free: int = 1, idle_timeout: float = 60.0, **kw: Any
) -> FunctionRecord:
    manifest = Manifest(scaling=ScalingSection(min_free=min_free, idle_timeout=idle_timeout))
    return FunctionRecord(
        name=name, version=version, manifest=manifest, artifact="img", runtime="process", created_at=0.0,
        updated_at=0.0, **kw,
    )  # fmt: skip


def inst(
    slot: int, *, function: str = "echo", version: int = 2, state: str = "free", revision: int | None = None, **kw: Any
) -> InstanceEntry:
    kw.setdefault("created_at", 0.0)
    record = msgspec.convert(
        {
            "function": function,
            "slot": slot,
            "instance_id": f"i{slot}",
            "version": version,
            "state": state,
            "runtime": "process",
            "owner": "o",
            **kw,
        },
        InstanceRecord,
    )
    return InstanceEntry(f"{function}.{slot}", revision if revision is not None else 100 + slot, record)


def lease(proxy_id: str, *, renewed_at: float, ttl: float = 6.0, revision: int = 7) -> LeaseEntry:
    return LeaseEntry(
        proxy_id,
        revision,
        ProxyLease(proxy_id=proxy_id, started_at=0.0, renewed_at=renewed_at, ttl=ttl),
    )


def run(
    instances: list[InstanceEntry],
    functions: list[FunctionRecord] | None = None,
    leases: list[LeaseEntry] | None = None,
    *,
    seen: dict[str, Seen] | None = None,
    now: float = NOW,
) -> Plan:
    functions = [fn()] if functions is None else functions
    snap = Snapshot(functions={f.name: f for f in functions}, instances=instances, leases=leases or [])
    return plan(snap, seen or {}, now, POLICY)


def watched(leases: list[LeaseEntry], since: float = NOW - 1000) -> dict[str, Seen]:
    """A reaper memory in which every lease has been seen, unchanged, since `since` (passes all succeeded)."""
    return {LEASE_MEMORY + le.key: Seen(revision=le.revision, since=since) for le in leases}


def drained(p: Plan) -> dict[str, str]:
    """key -> reason of every Drain in the plan."""
    return {a.entry.key: a.reason for a in p.actions if isinstance(a, Drain)}


# -- idle reaping --------------------------------------------------------------------------------------------


def test_free_instance_idle_longer_than_timeout_is_drained_at_its_revision() -> None:
    keep = inst(1, last_used=NOW - 1)
    idle = inst(2, last_used=NOW - 61, revision=42)
    p = run([keep, idle])
    assert drained(p) == {"echo.2": "idle"}
    (action,) = p.actions
    assert isinstance(action, Drain)
    assert action.entry == idle  # decided on revision 42: any change since makes the drain lose
    assert not action.busy_ok


def test_free_instance_within_idle_timeout_is_kept() -> None:
    p = run([inst(1, last_used=NOW - 1), inst(2, last_used=NOW - 59), inst(3, last_used=NOW - 60)])
    assert p.actions == []


def test_idle_timeout_is_per_function() -> None:
    functions = [fn("fast", idle_timeout=5, min_free=0), fn("slow", idle_timeout=500, min_free=0)]
    p = run([inst(1, function="fast", last_used=NOW - 10), inst(1, function="slow", last_used=NOW - 10)], functions)
    assert drained(p) == {"fast.1": "idle"}


def test_min_free_keeps_the_most_recently_used() -> None:
    instances = [inst(s, last_used=NOW - 100 * s) for s in range(1, 6)]  # slot 1 used last, slot 5 longest ago
    p = run(instances, [fn(min_free=2)])
    assert drained(p) == {"echo.3": "idle", "echo.4": "idle", "echo.5": "idle"}


def test_min_free_keeps_recent_ones_whatever_the_listing_order() -> None:
    instances = [inst(1, last_used=NOW - 500), inst(2, last_used=NOW - 100), inst(3, last_used=NOW - 300)]
    p = run(list(reversed(instances)), [fn(min_free=1)])
    assert drained(p) == {"echo.1": "idle", "echo.3": "idle"}


def test_never_used_instance_counts_idle_from_creation() -> None:
    p = run([inst(1, created_at=NOW - 100), inst(2, created_at=NOW - 10)], [fn(min_free=0)])
    assert drained(p) == {"echo.1": "idle"}


def test_min_free_zero_scales_to_zero() -> None:
    instances = [inst(s, last_used=NOW - 61 - s) for s in range(1, 4)]
    p = run(instances, [fn(min_free=0)])
    assert set(drained(p)) == {"echo.1", "echo.2", "echo.3"}


def test_min_free_counts_only_free_instances() -> None:
    """A busy instance is not warm capacity: min_free keeps one of the free ones."""
    busy = inst(1, state="busy", claimed_by="p1", claimed_at=NOW - 1000)
    free = [inst(2, last_used=NOW - 100), inst(3, last_used=NOW - 200)]
    p = run([busy, *free], [fn(min_free=1)], [lease("p1", renewed_at=NOW)])
    assert drained(p) == {"echo.3": "idle"}


def test_old_version_and_retired_are_reaped_when_free_and_not_counted_toward_min_free() -> None:
    old = inst(1, version=1, last_used=NOW)  # just used: not idle at all
    retired = inst(2, retire=True, last_used=NOW)
    current = inst(3, last_used=NOW - 1000)  # the only one counted: kept as the one warm instance
    p = run([old, retired, current], [fn(version=2, min_free=1)])
    assert drained(p) == {"echo.1": "old_version", "echo.2": "retired"}


def test_deleting_function_reaps_every_free_instance() -> None:
    p = run([inst(1, last_used=NOW), inst(2, last_used=NOW)], [fn(min_free=3, deleting=True)])
    assert drained(p) == {"echo.1": "function_deleted", "echo.2": "function_deleted"}


def test_newer_version_than_the_record_is_an_upload_in_flight_only_idle_applies() -> None:
    fresh = inst(1, version=3, last_used=NOW - 1)
    stale = inst(2, version=3, last_used=NOW - 61)
    p = run([fresh, stale], [fn(version=2, min_free=5)])
    assert drained(p) == {"echo.2": "idle"}


def test_function_without_record_gets_the_default_idle_timeout() -> None:
    default = ScalingSection().idle_timeout
    p = run([inst(1, last_used=NOW - default + 1), inst(2, last_used=NOW - default - 1)], functions=[])
    assert drained(p) == {"echo.2": "idle"}


def test_starting_draining_unhealthy_are_never_drained() -> None:
    instances = [
        inst(1, state="starting", last_used=0.0),
        inst(2, state="draining", last_used=0.0),
        inst(3, state="unhealthy", last_used=0.0),
    ]
    assert drained(run(instances, [fn(min_free=0)])) == {}


# -- busy instances and proxy leases -------------------------------------------------------------------------


def test_busy_instance_of_a_live_proxy_is_never_chosen_however_old_or_obsolete() -> None:
    busy = [
        inst(1, state="busy", claimed_by="p1", claimed_at=0.0, last_used=0.0),
        inst(2, state="busy", claimed_by="p1", claimed_at=0.0, version=1, retire=True),
    ]
    p = run(busy, [fn(min_free=0, idle_timeout=0, deleting=True)], [lease("p1", renewed_at=NOW - 1)])
    assert p.actions == []


def test_expired_lease_is_deleted_at_its_revision() -> None:
    leases = [lease("dead", renewed_at=NOW - 7, ttl=6, revision=9), lease("alive", renewed_at=NOW - 5, ttl=6)]
    p = run([], leases=leases, seen=watched(leases))
    assert p.actions == [DeleteLease(proxy_id="dead", revision=9)]


def test_lease_expiry_uses_the_lease_own_ttl() -> None:
    leases = [lease("slow", renewed_at=NOW - 20, ttl=30), lease("fast", renewed_at=NOW - 3, ttl=2)]
    p = run([], leases=leases, seen=watched(leases))
    assert [a.proxy_id for a in p.actions if isinstance(a, DeleteLease)] == ["fast"]


def test_busy_instances_of_a_dead_proxy_are_recycled() -> None:
    leases = [lease("dead", renewed_at=NOW - 100), lease("alive", renewed_at=NOW)]
    instances = [
        inst(1, state="busy", claimed_by="dead", claimed_at=NOW - 200, revision=51),
        inst(2, state="busy", claimed_by="alive", claimed_at=NOW - 200),
    ]
    p = run(instances, leases=leases, seen=watched(leases))
    assert drained(p) == {"echo.1": "dead_proxy"}
    (drain,) = (a for a in p.actions if isinstance(a, Drain))
    assert drain.entry.revision == 51
    assert drain.busy_ok  # its proxy is dead: the one case a busy instance is drained


def test_a_handed_off_claim_of_a_dead_proxy_is_left_to_its_instance() -> None:
    """Socket handoff: the stream lives in the instance, not in the dead proxy; the instance exits after it (its
    entry then goes), so recycling it would cut a live stream."""
    leases = [lease("dead", renewed_at=NOW - 100)]
    instances = [
        inst(1, state="busy", claimed_by="dead", claimed_at=NOW - 200, handed_off=True),
        inst(2, state="busy", claimed_by="dead", claimed_at=NOW - 200),
        inst(3, state="busy", claimed_by="gone", claimed_at=NOW - 200, handed_off=True),
    ]
    assert drained(run(instances, leases=leases, seen=watched(leases))) == {"echo.2": "dead_proxy"}


def test_a_dead_proxys_handed_off_stream_is_cut_once_past_its_longest_duration() -> None:
    """The instance enforces the longest duration itself, but it runs the function's code, which can switch that
    off; with its proxy dead, only the reaper is left to end such a stream. It goes by the end its proxy recorded
    (the limit the stream started with): a redeploy's shorter limit (60 s here) does not cut an older stream."""
    shorter = msgspec.structs.replace(fn(), manifest=Manifest(limits=LimitsSection(stream_max_duration=60)))
    leases = [lease("dead", renewed_at=NOW - 100), lease("alive", renewed_at=NOW)]
    ended = NOW - OVERDUE_GRACE  # the longest duration ended this long ago
    instances = [
        inst(1, state="busy", claimed_by="dead", claimed_at=NOW - 9000, handed_off=True, handed_off_until=ended - 1),
        inst(2, state="busy", claimed_by="dead", claimed_at=NOW - 9000, handed_off=True, handed_off_until=ended + 1),
        inst(3, state="busy", claimed_by="dead", claimed_at=NOW - 9000, handed_off=True),  # no longest duration
        inst(4, state="busy", claimed_by="alive", claimed_at=NOW - 9000, handed_off=True, handed_off_until=ended - 1),
    ]
    for functions in ([fn()], [shorter], []):
        p = run(instances, functions, leases=leases, seen=watched(leases))
        assert drained(p) == {"echo.1": "overdue"}
        assert all(a.busy_ok for a in p.actions if isinstance(a, Drain))


def test_busy_instance_of_a_proxy_without_any_lease_is_recycled_after_the_grace() -> None:
    instances = [
        inst(1, state="busy", claimed_by="gone", claimed_at=NOW - POLICY.lease_grace - 1),
        inst(2, state="busy", claimed_by="new", claimed_at=NOW - POLICY.lease_grace + 1),  # lease not seen yet
    ]
    assert drained(run(instances)) == {"echo.1": "dead_proxy"}


def test_recent_claim_of_an_expired_lease_waits_for_the_grace() -> None:
    instances = [inst(1, state="busy", claimed_by="p", claimed_at=NOW - 1)]
    leases = [lease("p", renewed_at=NOW - 100)]
    p = run(instances, leases=leases, seen=watched(leases))
    assert drained(p) == {}
    assert any(isinstance(a, DeleteLease) for a in p.actions)


def test_an_outage_is_not_a_death_leases_are_judged_on_time_the_reaper_watched() -> None:
    """Reliability finding 2: after NATS was away 20 s, every lease looked expired by the clock and the reaper
    drained every busy instance, cutting streams that had survived the outage."""
    leases = [lease("p", renewed_at=NOW - 20, ttl=6, revision=7)]
    busy = [inst(1, state="busy", claimed_by="p", claimed_at=NOW - 60)]
    first = run(busy, leases=leases)  # first pass after the outage: no observation yet
    assert first.actions == []
    later = run(busy, leases=leases, seen=first.seen, now=NOW + 5)  # watched 5 s < ttl: still not judged
    assert later.actions == []
    assert later.seen[LEASE_MEMORY + "p"].since == NOW
    renewed = [lease("p", renewed_at=NOW + 2, ttl=6, revision=8)]  # the proxy renews on reconnect
    assert run(busy, leases=renewed, seen=later.seen, now=NOW + 7).actions == []
    # A proxy that never renews is dead once watched unchanged for longer than its ttl and the failover grace (the
    # time a holder whose server was paused needs to notice and reconnect elsewhere).
    grace = run(busy, leases=leases, seen=later.seen, now=NOW + 6.5)
    assert grace.actions == []
    dead = run(busy, leases=leases, seen=later.seen, now=NOW + 6 + FAILOVER_GRACE + 0.5)
    assert DeleteLease(proxy_id="p", revision=7) in dead.actions and drained(dead) == {"echo.1": "dead_proxy"}


def test_busy_without_claim_info_counts_from_creation() -> None:
    instances = [inst(1, state="busy", created_at=NOW - 100), inst(2, state="busy", created_at=NOW - 1)]
    assert drained(run(instances)) == {"echo.1": "dead_proxy"}


# -- lost stop requests ------------------------------------------------------------------------------------


def test_entries_awaiting_their_stop_are_left_to_the_control_plane_however_long() -> None:
    """Lost-stop recovery has one owner, the control plane (controlplane/decisions.plan_retirement)."""
    entries = [inst(1, state="draining", revision=30), inst(2, state="unhealthy", revision=31)]
    assert run(entries, now=NOW).actions == []
    assert run(entries, now=NOW + 10_000).actions == []


def test_memory_holds_only_leases() -> None:
    p = run([inst(2, state="draining", revision=3)], leases=[lease("p", renewed_at=NOW)])
    assert set(p.seen) == {LEASE_MEMORY + "p"}


def test_plan_of_an_empty_registry_is_empty() -> None:
    assert run([], functions=[]) == Plan(actions=[], seen={})


# -- dead hosts ---------------------------------------------------------------------------------------------


def host_lease(host_id: str, *, renewed_at: float, revision: int = 3) -> HostEntry:
    return HostEntry(
        host_id,
        revision,
        HostLease(host_id=host_id, runtime="docker", capacity=10, started_at=0.0, renewed_at=renewed_at, ttl=6.0),
    )


def run_hosts(instances: list[InstanceEntry], hosts: list[HostEntry], seen: dict[str, Seen]) -> Plan:
    snap = Snapshot(functions={"echo": fn()}, instances=instances, hosts=hosts)
    return plan(snap, seen, NOW, POLICY)


def test_a_dead_hosts_lease_goes_and_its_entries_are_forgotten_in_any_state() -> None:
    hosts = [host_lease("h1", renewed_at=NOW - 100), host_lease("h2", renewed_at=NOW)]
    watched_since = {HOST_MEMORY + h.key: Seen(revision=h.revision, since=NOW - 100) for h in hosts}
    instances = [
        inst(1, state="busy", host="h1", claimed_by="p", claimed_at=NOW - 50),
        inst(2, state="free", host="h1", last_used=NOW),
        inst(3, state="free", host="h2", last_used=NOW),
        inst(4, state="free", last_used=NOW),  # the control plane's own runtime: no host
    ]
    p = run_hosts(instances, hosts, watched_since)
    assert DeleteHost(host_id="h1", revision=3) in p.actions
    assert sorted(a.entry.key for a in p.actions if isinstance(a, Forget)) == ["echo.1", "echo.2"]
    assert not [a for a in p.actions if isinstance(a, Drain)]  # forgotten, not drained: no stop request


def test_an_outage_is_not_a_hosts_death_either() -> None:
    """Just as for proxies: an expired host lease is dead only once watched unchanged for longer than its ttl."""
    hosts = [host_lease("h1", renewed_at=NOW - 100)]
    first = run_hosts([inst(1, host="h1", last_used=NOW)], hosts, {})
    assert first.actions == []
    assert first.seen[HOST_MEMORY + "h1"] == Seen(revision=3, since=NOW)


def test_entries_of_a_host_without_any_lease_are_forgotten_after_the_grace() -> None:
    young = inst(1, host="gone", created_at=NOW - 1, last_used=NOW)
    old = inst(2, host="gone", created_at=NOW - 100, last_used=NOW)
    p = run_hosts([young, old], [], {})
    assert [a.entry.key for a in p.actions if isinstance(a, Forget)] == ["echo.2"]
