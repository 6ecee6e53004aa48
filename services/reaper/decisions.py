"""The reaper's decisions, free of I/O: which free instances to reap, which leases are dead, which claims are
orphaned.

`plan()` takes one snapshot of the registry (entries with their KV revisions), the reaper's memory of when it first
saw each lease revision, and `now`; it returns the actions and the memory for the next pass. Every drain it asks for
names the entry (and revision) it was decided on, so the service's compare-and-set turns any change made meanwhile
(a proxy's claim, another reaper's drain) into a no-op. A drain whose stop request is lost is not the reaper's to
recover: the control plane that owns the instance stops an entry left draining (controlplane/decisions.py).

Which free instances are reaped, per function:
- obsolete (`instance_lifecycle.obsolete`: retired, of an older version than the function record, or of a function
  being deleted): at once; they serve no new stream, so they are never counted toward `min_free`;
- of the current version: all but the `min_free` most recently used, once idle longer than `idle_timeout`;
- of a version newer than the record (an upload still in flight) or of a function without a record (not
  published yet, or already gone): only once idle longer than the idle timeout, never counted toward `min_free`.
Busy instances are only touched when the proxy holding them is dead (invariant 4); then their stream state is
unknown, so they are recycled rather than reused. A claim flagged `handed_off` is left alone: its stream lives in the
instance, not in the dead proxy, and the instance exits once that stream ended unacknowledged (the control plane then
removes its entry; aube.instance.handoff). A claim its proxy keeps flagged after such a stream, for its next
client, is left alone too: that instance exits once its proxy's control connection ends. But the instance runs the
function's code, which can switch off its own check of the stream's longest duration, and with its proxy dead
nothing else checks it: such a claim is drained
(and its stream cut) once OVERDUE_GRACE past the end of the longest duration its proxy passed to the instance
(`handed_off_until`: the limit the stream started with, whatever a redeploy set since).

When is a proxy dead? Its lease must be past `renewed_at + ttl` by the clock AND this reaper must have seen that
same lease revision, unchanged, for longer than `ttl` (plus FAILOVER_GRACE) of its own successful passes, each of
which found a leader for the lease buckets (`Reaper.leases_writable`). The second rule keeps an outage
from being judged as a death (invariant 9): after NATS (or the reaper itself) was away, every lease looks old by the
clock, but the reaper's observation starts again when it can read the registry, and a live proxy renews within
ttl/3 of that (at once, on reconnect). The service forgets its observations whenever a pass fails or passes were
further apart than an outage allows (`Reaper.run`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

import msgspec

from aube.shared import instance_lifecycle as lifecycle
from aube.shared.hostbook import HostEntry
from aube.shared.registry import InstanceEntry, LeaseEntry
from aube.shared.schemas import FunctionRecord, InstanceRecord, ProxyLease, ScalingSection

Reason = Literal[
    "idle",  # free longer than the function's idle timeout, beyond min_free
    "retired",  # marked retire=True by delete or re-upload
    "old_version",  # a newer version of the function is current
    "function_deleted",  # the function record says deleting
    "dead_proxy",  # busy, claimed by a proxy without a live lease
    "lease_expired",  # a proxy lease past renewed_at + ttl
    "dead_host",  # placed on a host whose agent's lease expired (or is gone): the instance went with its host
    "overdue",  # a dead proxy's handed-off stream OVERDUE_GRACE past the longest duration it started with
]

_DEFAULT_SCALING = ScalingSection()


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    functions: dict[str, FunctionRecord] = msgspec.field(default_factory=dict)
    instances: list[InstanceEntry] = msgspec.field(default_factory=list)
    leases: list[LeaseEntry] = msgspec.field(default_factory=list)
    hosts: list[HostEntry] = msgspec.field(default_factory=list)


class Policy(msgspec.Struct, frozen=True, kw_only=True):
    # A busy claim by a proxy without a live lease is only judged dead once claimed longer than this, so a
    # replica that claimed before its first lease write is visible is not misjudged.
    lease_grace: float


class Seen(msgspec.Struct, frozen=True, kw_only=True):
    """When the reaper first saw a lease at `revision`; any renewal restarts it."""

    revision: int
    since: float


class DeleteLease(msgspec.Struct, frozen=True, kw_only=True, tag="delete_lease"):
    proxy_id: str
    revision: int
    reason: Reason = "lease_expired"


class Drain(msgspec.Struct, frozen=True, kw_only=True, tag="drain"):
    """CAS the entry from the revision it was decided on to draining, and only if that wins, ask for the stop."""

    entry: InstanceEntry  # as read when decided: a change since makes the drain lose
    reason: Reason
    busy_ok: bool = False  # a busy one is drained only when its proxy is dead


class DeleteHost(msgspec.Struct, frozen=True, kw_only=True, tag="delete_host"):
    """Delete a dead host's lease at the revision judged dead (a renewal meanwhile keeps it)."""

    host_id: str
    revision: int


class Forget(msgspec.Struct, frozen=True, kw_only=True, tag="forget"):
    """Delete the entry of an instance whose host is dead, at the revision decided on. No stop request: the instance
    went with its host; if the host comes back, its agent stops what no entry knows (services/agent)."""

    entry: InstanceEntry
    reason: Reason = "dead_host"


Action = DeleteLease | Drain | DeleteHost | Forget


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    actions: list[Action]
    # The memory to pass to the next plan(): LEASE_MEMORY + proxy id and HOST_MEMORY + host id -> when that lease
    # revision was first seen.
    seen: dict[str, Seen]


LEASE_MEMORY = "lease:"  # prefix of a proxy lease's entry in `seen`
HOST_MEMORY = "host:"  # prefix of a host lease's entry in `seen`
# Seconds of observation beyond a lease's ttl before its holder is judged dead: a holder whose NATS server was paused
# or cut off first notices (two unanswered 1 s pings) and reconnects elsewhere (a 2 s connect timeout per dead
# server), and only then renews. Without it the rig saw a live proxy or host judged dead, and its streams cut, when
# its server was paused while the lease bucket's leader lived elsewhere.
FAILOVER_GRACE = 2.0
# Seconds past a handed-off stream's longest duration before the reaper cuts it (its proxy dead): an honest instance
# closes the stream at the limit and exits within its acknowledgement wait (a few seconds) well before, and the
# proxy's and the reaper's wall clocks may differ by a little.
OVERDUE_GRACE = 10.0


def plan(snapshot: Snapshot, seen: dict[str, Seen], now: float, policy: Policy) -> Plan:
    """Everything one reaper pass should do, and the memory to carry to the next pass."""
    dead, lease_memory = dead_leases(snapshot.leases, seen, now)
    live = {lease.key for lease in snapshot.leases} - {lease.key for lease in dead}
    gone_hosts, host_memory = dead_hosts(snapshot.hosts, seen, now)
    live_hosts = {h.key for h in snapshot.hosts} - {h.key for h in gone_hosts}
    actions: list[Action] = [DeleteLease(proxy_id=lease.key, revision=lease.revision) for lease in dead]
    actions.extend(DeleteHost(host_id=h.key, revision=h.revision) for h in gone_hosts)
    lost = lost_with_their_host(snapshot.instances, live_hosts, now, policy.lease_grace)
    actions.extend(lost)
    forgotten = {f.entry.key for f in lost}
    remaining = [i for i in snapshot.instances if i.key not in forgotten]
    actions.extend(idle_reaps(snapshot.functions, remaining, now))
    actions.extend(orphaned_claims(remaining, live, now, policy.lease_grace))
    return Plan(actions=actions, seen={**lease_memory, **host_memory})


def lease_expired(lease: ProxyLease, now: float) -> bool:
    return lease.renewed_at + lease.ttl < now


def _watched(key: str, revision: int, seen: dict[str, Seen], now: float) -> Seen:
    """When this reaper first saw this revision of a lease (memory under `key`): now, if it is new."""
    before = seen.get(key)
    return before if before is not None and before.revision == revision else Seen(revision=revision, since=now)


def dead_leases(
    leases: list[LeaseEntry], seen: dict[str, Seen], now: float
) -> tuple[list[LeaseEntry], dict[str, Seen]]:
    """Leases expired by the clock and seen unchanged by this reaper for longer than their ttl; and the memory of
    when each lease revision was first seen."""
    dead: list[LeaseEntry] = []
    memory: dict[str, Seen] = {}
    for lease in leases:
        first = memory[LEASE_MEMORY + lease.key] = _watched(LEASE_MEMORY + lease.key, lease.revision, seen, now)
        if lease_expired(lease.record, now) and now - first.since > lease.record.ttl + FAILOVER_GRACE:
            dead.append(lease)
    return dead, memory


def dead_hosts(hosts: list[HostEntry], seen: dict[str, Seen], now: float) -> tuple[list[HostEntry], dict[str, Seen]]:
    """Host leases dead by the same rule as proxies' (expired, and watched unchanged for longer than their ttl)."""
    dead: list[HostEntry] = []
    memory: dict[str, Seen] = {}
    for host in hosts:
        first = memory[HOST_MEMORY + host.key] = _watched(HOST_MEMORY + host.key, host.revision, seen, now)
        expired = host.record.renewed_at + host.record.ttl < now
        if expired and now - first.since > host.record.ttl + FAILOVER_GRACE:
            dead.append(host)
    return dead, memory


def lost_with_their_host(
    instances: list[InstanceEntry], live_hosts: set[str], now: float, grace: float
) -> list[Forget]:
    """Entries placed on a host without a live lease, in any state: their instance and its stream are gone. One younger
    than `grace` is left alone (its host may have just started and not yet shown its first lease)."""
    return [
        Forget(entry=inst)
        for inst in instances
        if inst.record.host and inst.record.host not in live_hosts and now - inst.record.created_at > grace
    ]


def idle_since(record: InstanceRecord) -> float:
    """When the instance last became free; one never used has been idle since it was created."""
    return max(record.last_used, record.created_at)


def idle_reaps(functions: dict[str, FunctionRecord], instances: list[InstanceEntry], now: float) -> list[Drain]:
    """Free instances to drain: obsolete ones at once, current ones past idle_timeout beyond min_free."""
    free_by_function: dict[str, list[InstanceEntry]] = defaultdict(list)
    for inst in instances:
        if inst.record.state == "free":
            free_by_function[inst.record.function].append(inst)

    drains: list[Drain] = []
    for name in sorted(free_by_function):
        fn = functions.get(name)
        scaling = _scaling(fn)
        current: list[InstanceEntry] = []
        for inst in free_by_function[name]:
            rec = inst.record
            if lifecycle.obsolete(rec, fn):
                drains.append(_drain(inst, _why_obsolete(rec, fn)))
            elif fn is not None and rec.version == fn.version:
                current.append(inst)
            elif now - idle_since(rec) > scaling.idle_timeout:
                # Unknown function or a version not published yet: only the idle timeout applies.
                drains.append(_drain(inst, "idle"))
        # Keep the most recently used ones warm: they are the least idle, so the oldest go first.
        current.sort(key=lambda i: (idle_since(i.record), i.key), reverse=True)
        for inst in current[max(scaling.min_free, 0) :]:
            if now - idle_since(inst.record) > scaling.idle_timeout:
                drains.append(_drain(inst, "idle"))
    return drains


def orphaned_claims(instances: list[InstanceEntry], live: set[str], now: float, lease_grace: float) -> list[Drain]:
    """Busy instances whose proxy holds no live lease (and claimed longer than the grace): recycle them; a handed-off
    one only once its stream is OVERDUE_GRACE past its longest duration."""
    drains: list[Drain] = []
    for inst in instances:
        rec = inst.record
        if rec.state != "busy" or (rec.claimed_by is not None and rec.claimed_by in live):
            continue
        if rec.handed_off:
            if rec.handed_off_until is not None and now > rec.handed_off_until + OVERDUE_GRACE:
                drains.append(_drain(inst, "overdue", busy_ok=True))
            continue
        claimed_at = rec.claimed_at if rec.claimed_at is not None else rec.created_at
        if now - claimed_at > lease_grace:
            drains.append(_drain(inst, "dead_proxy", busy_ok=True))
    return drains


def _scaling(fn: FunctionRecord | None) -> ScalingSection:
    return _DEFAULT_SCALING if fn is None else fn.manifest.scaling


def _drain(inst: InstanceEntry, reason: Reason, *, busy_ok: bool = False) -> Drain:
    return Drain(entry=inst, reason=reason, busy_ok=busy_ok)


def _why_obsolete(rec: InstanceRecord, fn: FunctionRecord | None) -> Reason:
    if fn is not None and fn.deleting:
        return "function_deleted"
    return "retired" if rec.retire else "old_version"
