"""Upload, re-upload and delete: which instances start, which become free, which stop and which finish their stream.

Fast: the control plane in-process with the fake runtime, on a real nats-server (conftest.py).
"""

from __future__ import annotations

import time

import msgspec
import pytest
from fake_plane import Plane

from aube.shared.schemas import DeleteRequest

pytestmark = pytest.mark.anyio


async def test_upload_starts_min_free_instances_and_marks_them_free(plane: Plane) -> None:
    reply = await plane.upload("echo", min_free=3, max_instances=5)

    assert (reply.version, reply.instances) == (1, 3)
    entries = await plane.entries("echo")
    assert [(e.record.slot, e.record.version, e.record.state) for e in entries] == [
        (0, 1, "free"),
        (1, 1, "free"),
        (2, 1, "free"),
    ]
    # Each entry names a live instance the runtime started for it, at the address that passed the health check.
    running = plane.runtime.instances_by_handle
    for e in entries:
        instance = running[e.record.handle]
        assert instance.alive and instance.instance_id == e.record.instance_id and instance.address == e.record.address
        assert e.record.secret and instance.spec.secret == e.record.secret
    assert len(plane.runtime.called("start")) == 3
    function = await plane.registry.get_function("echo")
    assert function is not None and function.record.version == 1
    assert function.record.artifact in plane.runtime.artifacts_by_ref


async def test_scale_to_zero_upload_checks_one_instance_then_stops_it(plane: Plane) -> None:
    reply = await plane.upload("cold", min_free=0, max_instances=2)

    assert reply.instances == 0
    assert await plane.entries("cold") == []
    # One instance was health-checked all the same (a broken version fails its upload, not its first stream).
    assert len(plane.runtime.started_ids()) == 1
    assert plane.runtime.alive_handles() == set()


async def test_reupload_stops_free_old_instances_and_marks_busy_ones_to_retire(plane: Plane) -> None:
    await plane.upload("echo", min_free=2, max_instances=5)
    old_free, old_busy = await plane.entries("echo")
    old_busy = await plane.claim(old_busy)

    reply = await plane.upload("echo", min_free=2, max_instances=5, code="def fn(websocket):\n    pass\n")

    assert reply.version == 2
    assert await plane.states("echo") == [(1, "busy"), (2, "free"), (2, "free")]
    (kept,) = [e for e in await plane.entries("echo") if e.record.version == 1]
    # The stream goes on: its instance runs, marked to stop once the stream ends, with no deadline.
    assert kept.record.instance_id == old_busy.record.instance_id
    assert kept.record.retire and kept.record.retire_deadline is None
    assert kept.record.handle in plane.runtime.alive_handles()
    # The free one stopped, and its entry went.
    assert (old_free.record.handle,) in plane.runtime.called("stop")
    assert old_free.record.handle not in plane.runtime.instances_by_handle
    assert (old_busy.record.handle,) not in plane.runtime.called("stop")


async def test_delete_stops_free_instances_and_ends_busy_ones_after_the_grace(plane: Plane) -> None:
    await plane.upload("echo", min_free=2, max_instances=3)
    free, busy = await plane.entries("echo")
    busy = await plane.claim(busy)
    grace = 30.0

    t0 = time.time()
    reply = await plane.cp.delete(DeleteRequest(name="echo", grace=grace))

    assert (reply.stopped, reply.draining) == (1, 1)
    assert free.record.handle not in plane.runtime.instances_by_handle
    (streaming,) = await plane.entries("echo")
    deadline = streaming.record.retire_deadline
    assert streaming.record.retire and deadline is not None
    assert t0 + grace <= deadline <= time.time() + grace
    function = await plane.registry.get_function("echo")
    assert function is not None and function.record.deleting

    await plane.cp.retire_pass()  # within the grace: the stream goes on
    assert busy.record.handle in plane.runtime.alive_handles()
    assert await plane.entries("echo") == [streaming]

    # The grace runs out (the deadline moved to the past rather than waiting 30 s): stopped, and the delete finishes.
    over = msgspec.structs.replace(streaming.record, retire_deadline=time.time() - 0.001)
    assert await plane.registry.update_instance(streaming.revision, over) is not None
    await plane.cp.retire_pass()
    assert busy.record.handle not in plane.runtime.instances_by_handle
    assert await plane.entries("echo") == []
    await plane.cp.retire_pass()
    assert await plane.registry.get_function("echo") is None
    assert plane.runtime.artifacts_by_ref == {}


async def test_delete_of_an_idle_function_removes_everything_at_once(plane: Plane) -> None:
    await plane.upload("echo", min_free=2, max_instances=3)

    reply = await plane.cp.delete(DeleteRequest(name="echo", grace=30.0))

    assert (reply.stopped, reply.draining) == (2, 0)
    assert await plane.entries() == []
    assert plane.runtime.instances_by_handle == {}
    assert await plane.registry.get_function("echo") is None
    assert plane.runtime.artifacts_by_ref == {}
