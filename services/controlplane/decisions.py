"""The control plane's decisions, free of I/O: which slots to take, what reconcile removes, what retirement stops,
which entries an instance's exit drops, and how many instances keep each function at `min_free`.

Inputs are registry records and runtime listings (msgspec Structs) and `now`; outputs are Structs naming what to do.
The service shell (service.py) performs them, each with a compare-and-set so a concurrent change wins over a stale
decision.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

import msgspec

from aube.controlplane.runtimes.base import Artifact, RunningInstance
from aube.shared import instance_lifecycle as lifecycle
from aube.shared.registry import FunctionEntry, InstanceEntry


def free_slots(taken: Collection[int], max_instances: int) -> list[int]:
    """Slot numbers a new instance may take, lowest first. Slots bound the instance count: a slot key is created
    absent-only, so however many scale requests race, at most `max_instances` instances exist."""
    return [slot for slot in range(max_instances) if slot not in taken]


class ReconcilePlan(msgspec.Struct, frozen=True, kw_only=True):
    stop_handles: list[str]  # runtime instances to stop: unknown to the registry, or exited
    delete_entries: list[InstanceEntry]  # registry entries whose instance is gone
    remove_artifacts: list[str]  # prepared versions nothing uses any more


def plan_reconcile(
    *,
    owner: str,
    running: Sequence[RunningInstance],
    entries: Sequence[InstanceEntry],
    functions: Sequence[FunctionEntry],
    artifacts: Sequence[Artifact],
    in_flight: Collection[str],
    busy_uploads: Collection[str],
    now: float,
    start_timeout: float,
    startup: bool,
) -> ReconcilePlan:
    """Make the runtime and the registry agree (invariant 2: nothing leaks, nothing dangles).

    `running` must be listed BEFORE `entries` are read: an instance is created after its entry, so an instance
    absent from a later registry snapshot really is an orphan. `in_flight` are instance ids this process is starting
    right now. At `startup` nothing is in flight, so a "starting" entry is a leftover of a crashed control plane:
    its instance (if any) and its entry both go.
    """
    mine = [e for e in entries if e.record.owner == owner]
    entry_ids = {e.record.instance_id for e in mine}
    alive_ids = {r.instance_id for r in running if r.alive}

    stop_handles = [
        r.handle
        for r in running
        if r.instance_id not in in_flight
        and (not r.alive or r.instance_id not in entry_ids or (startup and _starting(mine, r.instance_id)))
    ]
    delete_entries = [
        e
        for e in mine
        if e.record.instance_id not in in_flight
        and (
            (
                e.record.instance_id not in alive_ids
                and (e.record.state != "starting" or startup or now - e.record.created_at > start_timeout)
            )
            or (startup and e.record.state == "starting")
        )
    ]

    current = {f.record.name: f.record.version for f in functions if not f.record.deleting}
    used = {(e.record.function, e.record.version) for e in entries}
    remove_artifacts = [
        a.ref
        for a in artifacts
        if a.function not in busy_uploads
        and current.get(a.function) != a.version
        and (a.function, a.version) not in used
    ]
    return ReconcilePlan(stop_handles=stop_handles, delete_entries=delete_entries, remove_artifacts=remove_artifacts)


def _starting(entries: Iterable[InstanceEntry], instance_id: str) -> bool:
    return any(e.record.instance_id == instance_id and e.record.state == "starting" for e in entries)


class RetirePlan(msgspec.Struct, frozen=True, kw_only=True):
    stop: list[InstanceEntry]  # retired or leftover-draining instances no stream uses, or past their grace
    finished_deletes: list[str]  # deleted functions with no instance left: drop the record and the artifacts


def plan_retirement(
    *,
    owner: str,
    entries: Sequence[InstanceEntry],
    functions: Sequence[FunctionEntry],
    in_flight: Collection[str],
    now: float,
    stale_after: float,
    first_seen: Mapping[tuple[str, int], float],
) -> RetirePlan:
    """Which retired instances to stop now (invariant 3: never one with a live stream, except after delete's
    documented grace), and which deletions are complete.

    This control plane is the one place where a lost stop request is recovered: a "draining" or "unhealthy" entry is
    normally stopped at the request of whoever drained it (proxy, reaper); one left at the same revision longer than
    `stale_after` (`first_seen` maps (key, revision) to when this control plane first saw it) lost that request and is
    stopped here, by the owner of the instance, the only service that can stop it.
    """
    records = {f.record.name: f.record for f in functions}
    deleting = {name for name, fn in records.items() if fn.deleting}
    stop: list[InstanceEntry] = []
    for e in entries:
        r = e.record
        if r.owner != owner or r.instance_id in in_flight or r.state == "starting":
            continue
        fn = records.get(r.function)
        if r.state == "busy":
            if r.retire_deadline is not None and now >= r.retire_deadline:
                stop.append(e)
        elif (r.state == "free" and lifecycle.obsolete(r, fn)) or (
            lifecycle.awaiting_stop(r)
            and (r.function in deleting or now - first_seen.get((e.key, e.revision), now) > stale_after)
        ):
            stop.append(e)
    with_instances = {e.record.function for e in entries}
    finished = sorted(name for name in deleting if name not in with_instances)
    return RetirePlan(stop=stop, finished_deletes=finished)


def exited_entries(
    *, owner: str, entries: Sequence[InstanceEntry], handles: Collection[str], in_flight: Collection[str]
) -> list[InstanceEntry]:
    """The registry entries of instances the runtime saw end (by handle), in any state but one this process is
    starting: its start sees the exit itself (the health check asks the runtime) and cleans up."""
    return [
        e
        for e in entries
        if e.record.owner == owner
        and e.record.handle
        and e.record.handle in handles
        and e.record.instance_id not in in_flight
    ]


def plan_top_up(
    *,
    entries: Sequence[InstanceEntry],
    functions: Sequence[FunctionEntry],
    runtime: str,
    skip: Collection[str],
    hold_until: Mapping[str, float],
    now: float,
) -> dict[str, int]:
    """How many instances to start, per function, to keep `min_free` warm ones without waiting for traffic.

    Warm: free or starting, of the current version, not marked to retire (old versions serve no new stream and
    retirement stops them, so they never count). Every entry of the function, whatever its version or state,
    holds a slot, so a top-up never passes `max_instances`. Nothing is started for a function being deleted, one
    in `skip` (an upload or a top-up of it under way here), one of another runtime, or one held back after
    failed starts until `hold_until[name]`. The reaper reaps free instances only beyond `min_free`, so what this
    starts is not reaped back.
    """
    by_function: dict[str, list[InstanceEntry]] = {}
    for e in entries:
        by_function.setdefault(e.record.function, []).append(e)
    plan: dict[str, int] = {}
    for f in functions:
        fn = f.record
        if fn.deleting or fn.name in skip or fn.runtime != runtime or hold_until.get(fn.name, 0.0) > now:
            continue
        mine = by_function.get(fn.name, [])
        warm = sum(1 for e in mine if lifecycle.warm(fn, e.record))
        scaling = fn.manifest.scaling
        count = min(scaling.min_free - warm, scaling.max_instances - len(mine))
        if count > 0:
            plan[fn.name] = count
    return plan


def hold_after_failures(failures: int, *, first: float = 1.0, longest: float = 60.0) -> float:
    """Seconds to wait before topping up a function again after `failures` failed starts (or rounds of early
    exits) in a row: none after one (instances killed together are replaced at once), then doubling from `first`
    up to `longest`, so a function that cannot start or crashes soon after does not spin the runtime."""
    if failures <= 1:
        return 0.0
    return float(min(longest, first * 2 ** (failures - 2)))
