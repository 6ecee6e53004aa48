"""The control plane in-process on a real nats-server and the fake runtime (fake_runtime.py), for fast tests of its
logic (tests/controlplane/, whose conftest.py makes one per test).

No loop runs unless a test starts it: each test drives the operations itself (upload, scale, delete, reconcile,
retirement), and `Plane.upkeep()` runs the exit watch and the min_free keeper only for the tests about them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
from fake_runtime import FakeRuntime
from harness import zip_files
from nats.aio.client import Client as NATS

from aube.controlplane.core import ControlPlane
from aube.controlplane.upkeep import Upkeep
from aube.shared import instance_lifecycle as lifecycle
from aube.shared.registry import InstanceEntry, Registry, Written
from aube.shared.schemas import InstanceRecord, UploadReply, UploadRequest

FN = "def fn(websocket):\n    for m in websocket:\n        websocket.send(m)\n"


def manifest(min_free: int, max_instances: int) -> str:
    return f"[scaling]\nmin_free = {min_free}\nmax_instances = {max_instances}\n"


@dataclass
class Plane:
    cp: ControlPlane
    runtime: FakeRuntime
    registry: Registry
    nc: NATS

    async def upload(self, name: str, min_free: int = 1, max_instances: int = 4, code: str = FN) -> UploadReply:
        bundle = zip_files({"fn.py": code, "aube.toml": manifest(min_free, max_instances)})
        return await self.cp.upload(UploadRequest(name=name, zip=bundle))

    async def entries(self, name: str | None = None) -> list[InstanceEntry]:
        return sorted(await self.registry.instances(name), key=lambda e: e.key)

    async def states(self, name: str) -> list[tuple[int, str]]:
        """(version, state) of every instance of `name`, sorted."""
        return sorted((e.record.version, e.record.state) for e in await self.registry.instances(name))

    async def claim(self, entry: InstanceEntry, proxy: str = "proxy-test") -> InstanceEntry:
        """A proxy's claim, written as a proxy writes it: free -> busy through the lifecycle, by compare-and-set."""
        now = time.time()
        instance_id = entry.record.instance_id
        applied = await self.registry.apply(
            entry.key, lambda r: lifecycle.claim(r, proxy, now, instance_id=instance_id), entry=entry, attempts=1
        )
        assert isinstance(applied, Written), f"claim of {entry.key} not written: {applied}"
        return applied.entry

    async def wait_for(
        self, check: Callable[[list[InstanceEntry]], bool], what: str, timeout: float = 5.0
    ) -> tuple[list[InstanceEntry], float]:
        """Poll the registry until `check(entries)` holds; return the entries and the seconds it took."""
        t0 = time.monotonic()
        with anyio.move_on_after(timeout):
            while not check(entries := await self.entries()):
                await anyio.sleep(0.01)
            return entries, time.monotonic() - t0
        raise AssertionError(f"not within {timeout:g} s: {what}; registry: {[_brief(e.record) for e in entries]}")

    @asynccontextmanager
    async def upkeep(self) -> AsyncIterator[Upkeep]:
        upkeep = Upkeep(self.cp)
        async with anyio.create_task_group() as tg:
            tg.start_soon(upkeep.run)
            # The exit watch is live once the runtime has a listener: exits before that would go unseen.
            with anyio.fail_after(5):
                while not self.runtime.called("watch_exits"):
                    await anyio.sleep(0.005)
            yield upkeep
            tg.cancel_scope.cancel()


def _brief(r: InstanceRecord) -> str:
    return f"{r.function}.{r.slot} v{r.version} {r.state}{' retire' if r.retire else ''} {r.handle}"
