"""The control plane's pure decisions: slots, reconcile, retirement."""

from __future__ import annotations

from aube.controlplane import decisions
from aube.controlplane.runtimes.base import Artifact, RunningInstance
from aube.shared.registry import FunctionEntry, InstanceEntry
from aube.shared.schemas import FunctionRecord, InstanceRecord, Manifest

OWNER = "cp1"
NOW = 1000.0


def entry(
    slot: int, state: str = "free", *, fn: str = "f", version: int = 1, owner: str = OWNER, **kw: object
) -> InstanceEntry:
    record = InstanceRecord(
        function=fn,
        slot=slot,
        instance_id=f"{fn}-i{slot}",
        version=version,
        state=state,  # type: ignore[arg-type]
        runtime="process",
        owner=owner,
        created_at=kw.pop("created_at", NOW - 100),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )
    return InstanceEntry(f"{fn}.{slot}", 10 + slot, record)


def running(instance_id: str, *, alive: bool = True) -> RunningInstance:
    return RunningInstance(
        handle=f"h-{instance_id}", instance_id=instance_id, function="f", version=1, slot=0, alive=alive
    )


def function(name: str = "f", version: int = 1, *, deleting: bool = False) -> FunctionEntry:
    rec = FunctionRecord(
        name=name, version=version, manifest=Manifest(), artifact=f"{name}:v{version}", runtime="process",
        created_at=0, updated_at=0, deleting=deleting,
    )  # fmt: skip
    return FunctionEntry(name, 1, rec)


def reconcile(**kw: object) -> decisions.ReconcilePlan:
    args: dict[str, object] = dict(
        owner=OWNER, running=[], entries=[], functions=[function()], artifacts=[], in_flight=set(),
        busy_uploads=set(), now=NOW, start_timeout=60.0, startup=False,
    )  # fmt: skip
    args.update(kw)
    return decisions.plan_reconcile(**args)  # type: ignore[arg-type]


def test_free_slots_lowest_first_and_bounded() -> None:
    assert decisions.free_slots({0, 2}, 4) == [1, 3]
    assert decisions.free_slots({0, 1, 2}, 3) == []


def test_consistent_state_needs_nothing() -> None:
    plan = reconcile(running=[running("f-i0")], entries=[entry(0)])
    assert plan == decisions.ReconcilePlan(stop_handles=[], delete_entries=[], remove_artifacts=[])


def test_orphan_instance_is_stopped_and_dangling_entry_dropped() -> None:
    plan = reconcile(running=[running("stray")], entries=[entry(0)])
    assert plan.stop_handles == ["h-stray"]
    assert [e.key for e in plan.delete_entries] == ["f.0"]


def test_exited_instance_is_removed_with_its_entry() -> None:
    plan = reconcile(running=[running("f-i0", alive=False)], entries=[entry(0)])
    assert plan.stop_handles == ["h-f-i0"]
    assert [e.key for e in plan.delete_entries] == ["f.0"]


def test_in_flight_starts_are_left_alone() -> None:
    plan = reconcile(running=[running("new")], entries=[entry(1, "starting")], in_flight={"new", "f-i1"})
    assert plan.stop_handles == []
    assert plan.delete_entries == []


def test_young_starting_entry_waits_but_old_one_goes() -> None:
    young = entry(0, "starting", created_at=NOW - 5)
    old = entry(1, "starting", created_at=NOW - 500)
    plan = reconcile(entries=[young, old])
    assert [e.key for e in plan.delete_entries] == ["f.1"]


def test_at_startup_starting_entries_are_leftovers_of_a_crash() -> None:
    leftover = entry(0, "starting", created_at=NOW - 1)
    plan = reconcile(running=[running("f-i0")], entries=[leftover], startup=True)
    assert plan.stop_handles == ["h-f-i0"]
    assert [e.key for e in plan.delete_entries] == ["f.0"]


def test_other_owners_entries_are_not_touched() -> None:
    plan = reconcile(entries=[entry(0, owner="someone-else")])
    assert plan.delete_entries == []


def test_unused_artifacts_go_current_and_used_ones_stay() -> None:
    artifacts = [
        Artifact(ref="f:v1", function="f", version=1),  # current
        Artifact(ref="f:v0", function="f", version=0),  # old, unused
        Artifact(ref="g:v3", function="g", version=3),  # unknown function, but an instance still uses it
        Artifact(ref="h:v1", function="h", version=1),  # uploading right now
    ]
    entries = [entry(0, "busy", fn="g", version=3)]
    plan = reconcile(artifacts=artifacts, entries=entries, running=[running("g-i0")], busy_uploads={"h"})
    assert plan.remove_artifacts == ["f:v0"]


def retire(entries: list[InstanceEntry], functions: list[FunctionEntry], **kw: object) -> decisions.RetirePlan:
    args: dict[str, object] = dict(
        owner=OWNER, entries=entries, functions=functions, in_flight=set(), now=NOW, stale_after=10.0, first_seen={}
    )
    args.update(kw)
    return decisions.plan_retirement(**args)  # type: ignore[arg-type]


def test_retired_free_instances_stop_busy_ones_never_before_deadline() -> None:
    old_free = entry(0, "free", version=1)
    old_busy = entry(1, "busy", version=1, retire=True)
    current = entry(2, "free", version=2)
    plan = retire([old_free, old_busy, current], [function(version=2)])
    assert [e.key for e in plan.stop] == ["f.0"]


def test_busy_past_delete_grace_is_stopped() -> None:
    busy = entry(0, "busy", retire=True, retire_deadline=NOW - 1)
    waiting = entry(1, "busy", retire=True, retire_deadline=NOW + 1)
    plan = retire([busy, waiting], [function(deleting=True)])
    assert [e.key for e in plan.stop] == ["f.0"]
    assert plan.finished_deletes == []


def test_delete_finishes_when_no_instance_is_left() -> None:
    plan = retire([], [function(deleting=True), function("g")])
    assert plan.finished_deletes == ["f"]


def test_draining_is_stopped_only_when_stale() -> None:
    draining = entry(0, "draining")
    assert retire([draining], [function()], first_seen={("f.0", 10): NOW - 1}).stop == []
    assert [e.key for e in retire([draining], [function()], first_seen={("f.0", 10): NOW - 11}).stop] == ["f.0"]


def test_starting_and_in_flight_are_never_retired() -> None:
    plan = retire(
        [entry(0, "starting", version=1), entry(1, "free", version=1)], [function(version=2)], in_flight={"f-i1"}
    )
    assert plan.stop == []


def test_retirement_and_the_reaper_agree_on_what_is_obsolete() -> None:
    """One rule (instance_lifecycle.obsolete): a free instance of a version newer than the record (an upload still
    publishing it) and one whose function has no readable record are not stopped; the reaper's idle timeout applies."""
    newer = entry(0, "free", version=3)
    unknown = entry(1, "free", fn="g", version=1)
    assert retire([newer, unknown], [function(version=2)]).stop == []


def test_an_unhealthy_entry_whose_stop_was_lost_is_stopped_here() -> None:
    unhealthy = entry(0, "unhealthy")
    assert retire([unhealthy], [function()], first_seen={("f.0", 10): NOW - 1}).stop == []
    assert [e.key for e in retire([unhealthy], [function()], first_seen={("f.0", 10): NOW - 11}).stop] == ["f.0"]
    # A deleted function's leftovers go at once.
    assert [e.key for e in retire([unhealthy], [function(deleting=True)]).stop] == ["f.0"]
