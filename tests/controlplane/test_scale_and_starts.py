"""Scale requests and starts that go wrong: the max_instances cap under concurrent requests, and a start that fails,
dies before its health check or never becomes healthy leaves no entry and no instance behind.

Fast: the control plane in-process with the fake runtime, on a real nats-server (conftest.py).
"""

from __future__ import annotations

import anyio
import pytest
from fake_plane import Plane
from fake_runtime import StartBehaviour

from aube.shared.errors import AubeError, CapacityExhausted, HealthCheckFailed, RuntimeFailure
from aube.shared.schemas import ScaleReply, ScaleRequest

pytestmark = pytest.mark.anyio


async def test_concurrent_scale_requests_never_pass_max_instances(plane: Plane) -> None:
    await plane.upload("echo", min_free=1, max_instances=3)
    # Every start waits at the gate: all requests have chosen their slots before any instance is up, so each sees
    # the registry as it was (one instance), and only the slot keys' create-if-absent stands between them and 15.
    plane.runtime.start_gate = anyio.Event()
    outcomes: list[object] = []

    async def scale() -> None:
        try:
            outcomes.append(await plane.cp.scale(ScaleRequest(name="echo", count=3)))
        except AubeError as e:
            outcomes.append(e)

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(scale)
        # Held until both free slots are starting and the other requests (at least three) have their answer.
        with anyio.fail_after(5):
            while len(plane.runtime.called("start")) < 3 or len(outcomes) < 3:
                await anyio.sleep(0.005)
        plane.runtime.start_gate.set()

    entries = await plane.entries("echo")
    assert len(entries) == 3 and {e.record.state for e in entries} == {"free"}
    assert len(plane.runtime.alive_handles()) == 3
    assert len(plane.runtime.called("start")) == 3  # the upload's one, then exactly the two free slots
    replies = [o for o in outcomes if isinstance(o, ScaleReply)]
    assert sum(len(r.started) for r in replies) == 2
    assert all(isinstance(o, CapacityExhausted) for o in outcomes if isinstance(o, AubeError))
    with pytest.raises(CapacityExhausted):
        await plane.cp.scale(ScaleRequest(name="echo", count=1))


@pytest.mark.parametrize(
    ("behaviour", "error", "health_timeout"),
    # A hanging instance is given up at the health timeout: a short one keeps that case fast.
    [("fail", RuntimeFailure, 1.0), ("die", HealthCheckFailed, 1.0), ("hang", HealthCheckFailed, 0.3)],
)
async def test_a_failed_start_leaves_no_entry_and_no_instance(
    plane: Plane, behaviour: StartBehaviour, error: type[AubeError]
) -> None:
    await plane.upload("echo", min_free=1, max_instances=3)
    before = await plane.entries("echo")
    plane.runtime.script_starts(behaviour)

    with pytest.raises(error):
        await plane.cp.scale(ScaleRequest(name="echo", count=1))

    assert await plane.entries("echo") == before
    assert {h for h, i in plane.runtime.instances_by_handle.items()} == {e.record.handle for e in before}
    # An instance that did start was stopped by the control plane itself (not left to reconcile).
    for instance_id, handle in plane.runtime.called("started")[1:]:
        assert (handle,) in plane.runtime.called("stop"), instance_id


async def test_an_upload_whose_every_start_fails_leaves_nothing(plane: Plane) -> None:
    plane.runtime.script_starts("die", "fail")

    with pytest.raises(AubeError):
        await plane.upload("broken", min_free=2, max_instances=3)

    assert await plane.entries() == []
    assert plane.runtime.instances_by_handle == {}
    assert await plane.registry.get_function("broken") is None
    assert plane.runtime.artifacts_by_ref == {}  # the version it built is removed too


async def test_an_upload_keeps_the_instances_that_started(plane: Plane) -> None:
    plane.runtime.script_starts("serve", "fail", "serve")

    reply = await plane.upload("echo", min_free=3, max_instances=3)

    # Two of three healthy: the version is live with what started; the keeper (upkeep) tops it up later.
    assert reply.instances == 2
    assert [s for _, s in await plane.states("echo")] == ["free", "free"]
    assert len(plane.runtime.alive_handles()) == 2
