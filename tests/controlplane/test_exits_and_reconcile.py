"""Keeping the registry true: reconcile (the backstop), exits noticed at once, and the min_free keeper's refills.

Fast: the control plane in-process with the fake runtime, on a real nats-server (conftest.py). The times printed
(pytest -s) are how long the control plane took; the bounds are generous for a shared machine.
"""

from __future__ import annotations

import msgspec
import pytest
from fake_plane import Plane

from aube.controlplane import upkeep
from aube.shared.schemas import InstanceRecord

pytestmark = pytest.mark.anyio

# An exit wakes the upkeep at once; measured 10-40 ms from the kill to the entry's drop and to the refill (2 s with
# tracemalloc on a loaded machine).
NOTICED_WITHIN = 10.0


@pytest.fixture
def no_periodic_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The upkeep also looks every KEEP_INTERVAL (1 s) without a wake-up; made ten minutes here, whatever these tests
    see within NOTICED_WITHIN was done because the exit was reported, not by a periodic round."""
    monkeypatch.setattr(upkeep, "KEEP_INTERVAL", 600.0)


async def test_reconcile_drops_entries_of_exited_instances_and_stops_unknown_ones(plane: Plane) -> None:
    await plane.upload("echo", min_free=3, max_instances=4)
    dead, survivor, third = await plane.entries("echo")
    # No exit watch runs: only reconcile can notice.
    plane.runtime.kill(dead.record.handle)
    orphan = plane.runtime.plant(plane.cp.owner, "echo", version=1, slot=3)
    # Another control plane on the same NATS and engine: its instance and its entry are not ours to judge.
    foreign = plane.runtime.plant("another-owner", "other", version=1, slot=0)
    foreign_record = InstanceRecord(
        function="other", slot=0, instance_id="theirs", version=1, state="free", runtime="process",
        owner="another-owner", handle=foreign, address="127.0.0.1:1",
    )  # fmt: skip
    assert await plane.registry.create_instance(foreign_record) is not None

    plan = await plane.cp.reconcile()

    assert [e.key for e in plan.delete_entries] == [dead.key]
    assert set(plan.stop_handles) == {dead.record.handle, orphan}
    assert [e.key for e in await plane.entries()] == [survivor.key, third.key, "other.0"]
    assert survivor.record.handle in plane.runtime.alive_handles()
    assert dead.record.handle not in plane.runtime.instances_by_handle  # the dead one's leftovers are removed
    assert orphan not in plane.runtime.instances_by_handle
    assert foreign in plane.runtime.alive_handles()  # another control plane's instance is not ours to stop


async def test_reconcile_at_startup_clears_what_a_crashed_control_plane_was_starting(plane: Plane) -> None:
    await plane.upload("echo", min_free=1, max_instances=2)
    (entry,) = await plane.entries("echo")
    starting = msgspec.structs.replace(entry.record, state="starting")
    assert await plane.registry.update_instance(entry.revision, starting) is not None

    plan = await plane.cp.reconcile(startup=True)

    assert plan.stop_handles == [entry.record.handle]
    assert await plane.entries() == []
    assert plane.runtime.instances_by_handle == {}


@pytest.mark.usefixtures("no_periodic_rounds")
async def test_an_exit_drops_the_entry_at_once_and_the_keeper_refills_min_free(plane: Plane) -> None:
    await plane.upload("echo", min_free=2, max_instances=4)
    first, second = await plane.entries("echo")

    async with plane.upkeep():
        plane.runtime.kill(first.record.handle)
        _, gone_after = await plane.wait_for(
            lambda entries: first.record.instance_id not in {e.record.instance_id for e in entries},
            "exit noticed",
            NOTICED_WITHIN,
        )
        entries, refilled_after = await plane.wait_for(
            lambda entries: sum(e.record.state == "free" for e in entries) == 2, "min_free restored", NOTICED_WITHIN
        )

    refilled_after += gone_after  # both counted from the kill
    print(
        f"after the kill: entry dropped in {gone_after * 1000:.0f} ms, min_free back in {refilled_after * 1000:.0f} ms"
    )
    assert gone_after < NOTICED_WITHIN and refilled_after < NOTICED_WITHIN
    assert second.record.instance_id in {e.record.instance_id for e in entries}
    assert len(entries) == 2 and all(e.record.handle in plane.runtime.alive_handles() for e in entries)
    assert first.record.handle not in plane.runtime.instances_by_handle  # its leftovers were removed


@pytest.mark.usefixtures("no_periodic_rounds")
async def test_the_keeper_refills_after_many_exits_within_max_instances(plane: Plane) -> None:
    await plane.upload("echo", min_free=3, max_instances=4)
    entries = await plane.entries("echo")
    busy = await plane.claim(entries[0])

    async with plane.upkeep():
        for e in entries[1:]:
            plane.runtime.kill(e.record.handle)
        after, took = await plane.wait_for(
            lambda entries: sum(e.record.state == "free" for e in entries) == 3, "min_free restored", NOTICED_WITHIN
        )
    print(f"3 free again {took * 1000:.0f} ms after 2 of 3 free instances died (1 busy)")
    assert took < NOTICED_WITHIN
    # The busy one counts towards max_instances: 1 busy + 3 free = 4, never more.
    assert sorted(e.record.state for e in after) == ["busy", "free", "free", "free"]
    assert busy.record.handle in plane.runtime.alive_handles()
    assert len(plane.runtime.alive_handles()) == 4


@pytest.mark.usefixtures("no_periodic_rounds")
async def test_a_busy_instance_that_dies_is_dropped_too(plane: Plane) -> None:
    await plane.upload("echo", min_free=1, max_instances=2)
    (entry,) = await plane.entries("echo")
    busy = await plane.claim(entry)

    async with plane.upkeep():
        plane.runtime.kill(busy.record.handle)
        await plane.wait_for(
            lambda entries: busy.record.instance_id not in {e.record.instance_id for e in entries},
            "busy dead instance dropped",
            timeout=NOTICED_WITHIN,
        )
