"""Reconcile against an instance that finishes starting during the pass, forced in order rather than hoped for.

The control plane runs in-process on the real process runtime and a real nats-server. The runtime's listing is
held back: reconcile lists the runtime, a scale-out then starts an instance and registers it, and only then does
reconcile read the registry and decide. The new instance is missing from the (older) listing, yet it was in
flight during the pass, so reconcile must leave it alone.
"""

from __future__ import annotations

import functools
import uuid
from pathlib import Path

import anyio
import pytest
from support import zip_base64

from aube.controlplane.core import ControlPlane
from aube.controlplane.runtimes.base import RunningInstance
from aube.controlplane.runtimes.process import ProcessRuntime
from aube.controlplane.service import serve
from aube.shared.natsserver import LocalNatsServer
from aube.shared.schemas import ScaleRequest, UploadRequest
from aube.shared.settings import ControlPlaneSettings

pytestmark = pytest.mark.anyio

REVERSE = Path(__file__).resolve().parents[2] / "examples" / "reverse"


class ListingHeldBack(ProcessRuntime):
    """The real process runtime, whose next listing is taken at once but handed over only when released."""

    def __init__(self, settings: ControlPlaneSettings) -> None:
        super().__init__(settings)
        self.armed = False
        self.listed = anyio.Event()
        self.release = anyio.Event()

    async def instances(self, owner: str) -> list[RunningInstance]:
        listing = await super().instances(owner)
        if self.armed:
            self.armed = False
            self.listed.set()
            await self.release.wait()
        return listing


async def test_reconcile_keeps_an_instance_that_started_during_its_pass(
    nats_server: LocalNatsServer, tmp_path: Path
) -> None:
    settings = ControlPlaneSettings(
        nats_url=nats_server.url,
        runtime="process",
        owner=f"t{uuid.uuid4().hex[:10]}",
        data_dir=str(tmp_path / "data"),
        reconcile_interval=3600,  # only the pass this test runs
        health_timeout=60,
        stop_instances_on_exit=True,
        controlplane_operator_port=0,  # a free port: a platform on this machine may hold 9091
    )
    runtime = ListingHeldBack(settings)
    async with anyio.create_task_group() as tg:
        cp: ControlPlane = await tg.start(functools.partial(serve, settings, runtime=runtime))
        manifest = "[scaling]\nmin_free = 1\nmax_instances = 3\n"
        await cp.upload(UploadRequest(name="rev", zip=zip_base64(REVERSE, {"aube.toml": manifest})))

        runtime.armed = True
        plans = []

        async def reconcile() -> None:
            plans.append(await cp.reconcile())

        tg.start_soon(reconcile)
        await runtime.listed.wait()  # the listing is taken: the instance below is not in it
        scaled = await cp.scale(ScaleRequest(name="rev", count=1))
        assert len(scaled.started) == 1
        new_id = scaled.started[0].instance_id
        runtime.release.set()
        with anyio.fail_after(30):
            while not plans:
                await anyio.sleep(0.01)

        assert plans[0].delete_entries == [] and plans[0].stop_handles == []
        entries = {e.record.instance_id: e.record for e in await cp.registry.instances("rev")}
        assert new_id in entries and entries[new_id].state == "free"
        assert new_id in {r.instance_id for r in await ProcessRuntime.instances(runtime, settings.owner) if r.alive}
        tg.cancel_scope.cancel()
    # serve's shutdown stopped every instance (stop_instances_on_exit).
    assert await ProcessRuntime(settings).instances(settings.owner) == []
