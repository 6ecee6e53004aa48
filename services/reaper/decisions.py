"""The reaper's decisions, free of I/O: which free instances to reap, which leases are dead, which claims are
orphaned, which stop requests were lost and must be sent again.

`plan()` takes one snapshot of the registry (as plain Structs with their KV revisions), the reaper's memory of
how long each draining/unhealthy entry has stayed at its revision, and `now`; it returns the actions and the
memory for the next pass. Every transition it asks for names the revision it was decided on, so the service's
compare-and-set turns any change made meanwhile (a proxy's claim, another reaper's drain) into a no-op.

Which free instances are reaped, per function:
- retired (`retire=True`), of an older version than the function record, or of a function being deleted:
  at once; they serve no new stream, so they are never counted toward `min_free`;
- of the current version: all but the `min_free` most recently used, once idle longer than `idle_timeout`;
- of a version newer than the record (an upload still in flight) or of a function without a record (not
  published yet, or already gone): only once idle longer than the idle timeout, never counted toward `min_free`.
Busy instances are only touched when the proxy holding them is dead (invariant 4); then their stream state is
unknown, so they are recycled rather than reused.

When is a proxy dead? Its lease must be past `renewed_at + ttl` by the clock AND this reaper must have seen that
same lease revision, unchanged, for longer than `ttl` of its own successful passes. The second rule keeps an outage
from being judged as a death (invariant 9): after NATS (or the reaper itself) was away, every lease looks old by the
clock, but the reaper's observation starts again when it can read the registry, and a live proxy renews within
ttl/3 of that (at once, on reconnect). The service forgets its observations whenever a pass fails or passes were
further apart than an outage allows (`Reaper.run`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

import msgspec

from aube.shared.schemas import FunctionRecord, InstanceRecord, ProxyLease, ScalingSection

Reason = Literal[
    "idle",  # free longer than the function's idle timeout, beyond min_free
    "retired",  # marked retire=True by delete or re-upload
    "old_version",  # a newer version of the function is current
    "function_deleted",  # the function record says deleting
    "dead_proxy",  # busy, claimed by a proxy without a live lease
    "lease_expired",  # a proxy lease past renewed_at + ttl
    "stale_draining",  # draining at one revision for too long: its stop request was lost
    "stale_unhealthy",  # unhealthy at one revision for too long
]

_DEFAULT_SCALING = ScalingSection()


class Instance(msgspec.Struct, frozen=True, kw_only=True):
    """A registry instance entry as read: the record and the revision any transition of it must name."""

    key: str
    revision: int
    record: InstanceRecord


class Lease(msgspec.Struct, frozen=True, kw_only=True):
    key: str  # the proxy id
    revision: int
    record: ProxyLease


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    functions: dict[str, FunctionRecord] = msgspec.field(default_factory=dict)
    instances: list[Instance] = msgspec.field(default_factory=list)
    leases: list[Lease] = msgspec.field(default_factory=list)


class Policy(msgspec.Struct, frozen=True, kw_only=True):
    # A busy claim by a proxy without a live lease is only judged dead once claimed longer than this, so a
    # replica that claimed before its first lease write is visible is not misjudged.
    lease_grace: float
    # A draining/unhealthy entry unchanged for this long lost its stop request; ask again.
    stale_after: float


class Seen(msgspec.Struct, frozen=True, kw_only=True):
    """When the reaper first saw an entry (draining/unhealthy, or a lease) at `revision`; any write restarts it."""

    revision: int
    since: float


class DeleteLease(msgspec.Struct, frozen=True, kw_only=True, tag="delete_lease"):
    proxy_id: str
    revision: int
    reason: Reason = "lease_expired"


class Drain(msgspec.Struct, frozen=True, kw_only=True, tag="drain"):
    """CAS the entry from `revision` to `record` (state draining), and only if that wins, ask for the stop."""

    key: str
    revision: int
    record: InstanceRecord  # the entry as it should become: state "draining"
    reason: Reason


class AskStop(msgspec.Struct, frozen=True, kw_only=True, tag="ask_stop"):
    """Send the stop request again for an entry already draining/unhealthy (no registry write)."""

    key: str
    record: InstanceRecord
    reason: Reason


Action = DeleteLease | Drain | AskStop


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    actions: list[Action]
    # The memory to pass to the next plan(): instance keys for stale stops, LEASE_MEMORY + proxy id for leases.
    seen: dict[str, Seen]


LEASE_MEMORY = "lease:"  # prefix of a lease's entry in `seen` (instance keys never start with it)


def plan(snapshot: Snapshot, seen: dict[str, Seen], now: float, policy: Policy) -> Plan:
    """Everything one reaper pass should do, and the memory to carry to the next pass."""
    dead, lease_memory = dead_leases(snapshot.leases, seen, now)
    live = {lease.key for lease in snapshot.leases} - {lease.key for lease in dead}
    actions: list[Action] = [DeleteLease(proxy_id=lease.key, revision=lease.revision) for lease in dead]
    actions.extend(idle_reaps(snapshot.functions, snapshot.instances, now))
    actions.extend(orphaned_claims(snapshot.instances, live, now, policy.lease_grace))
    asks, next_seen = stale_stops(snapshot.instances, seen, now, policy.stale_after)
    actions.extend(asks)
    return Plan(actions=actions, seen={**next_seen, **lease_memory})


def lease_expired(lease: ProxyLease, now: float) -> bool:
    return lease.renewed_at + lease.ttl < now


def dead_leases(leases: list[Lease], seen: dict[str, Seen], now: float) -> tuple[list[Lease], dict[str, Seen]]:
    """Leases expired by the clock and seen unchanged by this reaper for longer than their ttl; and the memory of
    when each lease revision was first seen."""
    dead: list[Lease] = []
    memory: dict[str, Seen] = {}
    for lease in leases:
        before = seen.get(LEASE_MEMORY + lease.key)
        first = (
            before
            if before is not None and before.revision == lease.revision
            else Seen(revision=lease.revision, since=now)
        )
        memory[LEASE_MEMORY + lease.key] = first
        if lease_expired(lease.record, now) and now - first.since > lease.record.ttl:
            dead.append(lease)
    return dead, memory


def idle_since(record: InstanceRecord) -> float:
    """When the instance last became free; one never used has been idle since it was created."""
    return max(record.last_used, record.created_at)


def idle_reaps(functions: dict[str, FunctionRecord], instances: list[Instance], now: float) -> list[Drain]:
    """Free instances to drain: obsolete ones at once, current ones past idle_timeout beyond min_free."""
    free_by_function: dict[str, list[Instance]] = defaultdict(list)
    for inst in instances:
        if inst.record.state == "free":
            free_by_function[inst.record.function].append(inst)

    drains: list[Drain] = []
    for name in sorted(free_by_function):
        fn = functions.get(name)
        scaling = _scaling(fn)
        current: list[Instance] = []
        for inst in free_by_function[name]:
            rec = inst.record
            if fn is not None and fn.deleting:
                drains.append(_drain(inst, "function_deleted"))
            elif rec.retire:
                drains.append(_drain(inst, "retired"))
            elif fn is not None and rec.version < fn.version:
                drains.append(_drain(inst, "old_version"))
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


def orphaned_claims(instances: list[Instance], live: set[str], now: float, lease_grace: float) -> list[Drain]:
    """Busy instances whose proxy holds no live lease (and claimed longer than the grace): recycle them."""
    drains: list[Drain] = []
    for inst in instances:
        rec = inst.record
        if rec.state != "busy" or (rec.claimed_by is not None and rec.claimed_by in live):
            continue
        claimed_at = rec.claimed_at if rec.claimed_at is not None else rec.created_at
        if now - claimed_at > lease_grace:
            drains.append(_drain(inst, "dead_proxy"))
    return drains


def stale_stops(
    instances: list[Instance], seen: dict[str, Seen], now: float, stale_after: float
) -> tuple[list[AskStop], dict[str, Seen]]:
    """Draining/unhealthy entries left at one revision for `stale_after`: their stop was lost, so ask again.

    Asking restarts the entry's clock, so a control plane that stays away gets one request per `stale_after`,
    not one per pass.
    """
    asks: list[AskStop] = []
    next_seen: dict[str, Seen] = {}
    for inst in instances:
        rec = inst.record
        if rec.state not in ("draining", "unhealthy"):
            continue
        before = seen.get(inst.key)
        if before is None or before.revision != inst.revision:
            next_seen[inst.key] = Seen(revision=inst.revision, since=now)
        elif now - before.since >= stale_after:
            reason: Reason = "stale_draining" if rec.state == "draining" else "stale_unhealthy"
            asks.append(AskStop(key=inst.key, record=rec, reason=reason))
            next_seen[inst.key] = Seen(revision=inst.revision, since=now)
        else:
            next_seen[inst.key] = before
    return asks, next_seen


def _scaling(fn: FunctionRecord | None) -> ScalingSection:
    return _DEFAULT_SCALING if fn is None else fn.manifest.scaling


def _drain(inst: Instance, reason: Reason) -> Drain:
    return Drain(
        key=inst.key,
        revision=inst.revision,
        record=msgspec.structs.replace(inst.record, state="draining"),
        reason=reason,
    )
