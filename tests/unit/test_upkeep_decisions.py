"""The control plane's pure decisions about instance exits and the min_free keeper."""

from __future__ import annotations

from aube.controlplane import decisions
from aube.shared.registry import FunctionEntry, InstanceEntry
from aube.shared.schemas import FunctionRecord, InstanceRecord, Manifest, ScalingSection

OWNER = "cp1"
NOW = 1000.0


def entry(
    slot: int, state: str = "free", *, fn: str = "f", version: int = 1, owner: str = OWNER, **kw: object
) -> InstanceEntry:
    fields: dict[str, object] = {"handle": f"h-{fn}-{slot}", "created_at": NOW - 100, **kw}
    record = InstanceRecord(
        function=fn, slot=slot, instance_id=f"{fn}-i{slot}", version=version, state=state,  # type: ignore[arg-type]
        runtime="process", owner=owner, **fields,  # type: ignore[arg-type]
    )  # fmt: skip
    return InstanceEntry(f"{fn}.{slot}", 10 + slot, record)


def function(
    name: str = "f", version: int = 1, *, min_free: int = 3, max_instances: int = 9, **kw: object
) -> FunctionEntry:
    manifest = Manifest(scaling=ScalingSection(min_free=min_free, max_instances=max_instances))
    fields: dict[str, object] = {"runtime": "process", "created_at": 0, "updated_at": 0, **kw}
    rec = FunctionRecord(
        name=name, version=version, manifest=manifest, artifact=f"{name}:v{version}", **fields,  # type: ignore[arg-type]
    )  # fmt: skip
    return FunctionEntry(name, 1, rec)


def top_up(entries: list[InstanceEntry], functions: list[FunctionEntry], **kw: object) -> dict[str, int]:
    args: dict[str, object] = dict(
        entries=entries, functions=functions, runtime="process", skip=set(), hold_until={}, now=NOW
    )
    args.update(kw)
    return decisions.plan_top_up(**args)  # type: ignore[arg-type]


# -- exits -------------------------------------------------------------------------------------------------------


def test_an_exit_names_the_entries_with_that_handle_in_any_state() -> None:
    entries = [entry(0), entry(1, "busy"), entry(2, "draining"), entry(3, "unhealthy"), entry(4)]
    handles = {"h-f-0", "h-f-1", "h-f-2", "h-f-3"}
    found = decisions.exited_entries(owner=OWNER, entries=entries, handles=handles, in_flight=set())
    assert [e.key for e in found] == ["f.0", "f.1", "f.2", "f.3"]


def test_an_exit_spares_instances_being_started_here_and_other_owners() -> None:
    entries = [entry(0, "starting"), entry(1, owner="cp2"), entry(2, "starting", handle="")]
    found = decisions.exited_entries(owner=OWNER, entries=entries, handles={"h-f-0", "h-f-1", ""}, in_flight={"f-i0"})
    assert found == []


def test_a_starting_entry_left_by_another_process_is_dropped_when_its_instance_ends() -> None:
    found = decisions.exited_entries(owner=OWNER, entries=[entry(0, "starting")], handles={"h-f-0"}, in_flight=set())
    assert [e.key for e in found] == ["f.0"]


# -- min_free ----------------------------------------------------------------------------------------------------


def test_the_warm_pool_is_refilled_to_min_free() -> None:
    # 7 of 9 free instances killed (the reliability issue's finding 7): 2 left, min_free 3.
    assert top_up([entry(0), entry(1)], [function()]) == {"f": 1}
    assert top_up([], [function()]) == {"f": 3}


def test_starting_instances_count_as_warm_and_busy_ones_do_not() -> None:
    assert top_up([entry(0), entry(1, "starting"), entry(2, "starting")], [function()]) == {}
    assert top_up([entry(0, "busy"), entry(1, "busy"), entry(2)], [function()]) == {"f": 2}


def test_max_instances_bounds_the_top_up_counting_every_slot() -> None:
    busy = [entry(slot, "busy") for slot in range(8)]
    assert top_up(busy, [function()]) == {"f": 1}
    assert top_up([*busy, entry(8, "draining")], [function()]) == {}
    old = [entry(slot, "busy", version=1) for slot in range(7)]
    assert top_up(old, [function(version=2)]) == {"f": 2}


def test_old_versions_and_retiring_instances_are_not_warm() -> None:
    entries = [entry(0, version=1), entry(1, version=1), entry(2, version=2, retire=True), entry(3, version=2)]
    assert top_up(entries, [function(version=2)]) == {"f": 2}


def test_above_min_free_nothing_is_started_so_the_reaper_is_not_fought() -> None:
    assert top_up([entry(slot) for slot in range(5)], [function()]) == {}
    assert top_up([], [function(min_free=0)]) == {}


def test_deleting_uploading_held_back_or_foreign_runtime_functions_are_left_alone() -> None:
    assert top_up([], [function(deleting=True)]) == {}
    assert top_up([], [function()], skip={"f"}) == {}
    assert top_up([], [function()], hold_until={"f": NOW + 1}) == {}
    assert top_up([], [function()], hold_until={"f": NOW}) == {"f": 3}
    assert top_up([], [function(runtime="docker")]) == {}


def test_each_function_is_counted_on_its_own() -> None:
    entries = [entry(0, fn="a"), entry(0, fn="b"), entry(1, fn="b"), entry(2, fn="b")]
    plan = top_up(entries, [function("a"), function("b"), function("c", min_free=1)])
    assert plan == {"a": 2, "c": 1}


def test_the_hold_after_failures_doubles_up_to_a_bound() -> None:
    assert decisions.hold_after_failures(0) == 0.0
    assert decisions.hold_after_failures(1) == 0.0
    assert [decisions.hold_after_failures(n) for n in (2, 3, 4, 5)] == [1.0, 2.0, 4.0, 8.0]
    assert decisions.hold_after_failures(50) == 60.0
