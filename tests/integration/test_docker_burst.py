"""A burst on Docker (issue 11, bursts): 50 clients at once on a function with min_free 2, and every one is served.

Before, 10 clients at once waited up to 8.5 s and a burst of 12 got four 503s: the scale-out's parallel container
starts took longer than the claim timeout. Now a waiting client keeps waiting while instances of its function are
starting, queued starts included (up to AUBE_CLAIM_TIMEOUT_MAX), and starts take turns (AUBE_DOCKER_START_CONCURRENCY,
8 at a time, each until its server listens), so the instances of a burst come up one batch after another instead of
all at the end (bench/NOTES.md, "Parallel Docker starts").

Here every client keeps its stream until all 50 have their echo: 50 streams at once need 50 instances, 48 started
for the burst. On this 2-core machine shared with other work (load 16-35) that takes 45-62 s, so the test sets the
ceiling to 240 s: at the default 60 s a run at load 28 had 34 clients refused at exactly 60 s (the ceiling, not the
start queue, is what refuses them on a loaded machine). Figures are printed (pytest -s); each start's time waiting
its turn, in the engine and until its server listened is in the control plane's log.

The other two show the turns on the engine's own events: at most N containers between create and start, and a
container that dies on start gives its turn back at once."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
from support import nats_client, zip_base64
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from aube.controlplane.runtimes.base import InstanceSpec
from aube.controlplane.runtimes.docker import DockerRuntime
from aube.shared import names
from aube.shared.bus import request
from aube.shared.schemas import Manifest, UploadReply, UploadRequest
from aube.shared.settings import ControlPlaneSettings

pytestmark = [pytest.mark.anyio, pytest.mark.docker, pytest.mark.timeout(600)]

CLIENTS = 50
MANIFEST = "[scaling]\nmin_free = 2\nmax_instances = 50\n"
ECHO_FN = """\
async def fn(websocket):
    async for message in websocket:
        await websocket.send("echo:" + message)
"""


@pytest.mark.parametrize("runtime_kind", ["docker"], indirect=True)
async def test_fifty_clients_at_once_on_docker_are_all_served(platform, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane()
    port, _ = await platform.start_proxy(AUBE_CLAIM_TIMEOUT_MAX="240")
    folder = tmp_path / "echo"
    folder.mkdir()
    (folder / "fn.py").write_text(ECHO_FN)
    async with nats_client(platform.nats_url) as (nc, registry):
        body = UploadRequest(name="echo", zip=zip_base64(folder, {"aube.toml": MANIFEST}))
        await request(nc, names.SUBJECT_UPLOAD, body, UploadReply, 300)
        served: list[float] = []
        refused: list[str] = []
        wrong: list[str] = []
        all_answered = anyio.Event()
        began = anyio.current_time()

        def answered() -> None:
            if len(served) + len(refused) == CLIENTS:
                all_answered.set()

        async def client(i: int) -> None:
            try:
                # Longer than the claim timeout's ceiling: the proxy, not the client, decides when to give up.
                async with connect(f"ws://127.0.0.1:{port}/echo", proxy=None, open_timeout=120) as ws:
                    waited = anyio.current_time() - began
                    await ws.send(f"client {i}")
                    answer = await ws.recv()
                    if answer != f"echo:client {i}":
                        wrong.append(f"client {i} got {answer!r}")
                    served.append(waited)
                    answered()
                    # Every stream stays open until all clients have their echo: 50 streams at once on 50 instances
                    # (a stream has its instance to itself), 48 of them started for the burst.
                    with anyio.move_on_after(150):
                        await all_answered.wait()
            except InvalidStatus as e:
                refused.append(f"client {i}: {e.response.status_code} {e.response.body!r}")
                answered()

        with anyio.fail_after(300):
            async with anyio.create_task_group() as tg:
                for i in range(CLIENTS):
                    tg.start_soon(client, i)
        took = anyio.current_time() - began
        instances = await registry.instances("echo")
    served.sort()
    print(
        f"{CLIENTS} clients at once on Docker (min_free 2): {len(served)} served, {len(refused)} refused, all done in "
        f"{took:.1f}s; waits p50 {served[len(served) // 2] if served else 0:.1f}s, max "
        f"{served[-1] if served else 0:.1f}s; {len(instances)} instances by then"
    )
    assert not refused, refused
    assert not wrong, wrong
    assert len(served) == CLIENTS


async def test_container_starts_take_turns_on_the_engine(
    instance_network: tuple[str, str], docker_cleanup: str, docker_client: Any, tmp_path: Path
) -> None:
    """Six starts at once with AUBE_DOCKER_START_CONCURRENCY=2: the engine's own events show at most two containers
    between their create and their start at any moment (unbounded, the six creates came before the first start)."""
    network, bridge = instance_network
    settings = ControlPlaneSettings(
        owner=docker_cleanup,
        data_dir=str(tmp_path / "data"),
        health_timeout=120.0,
        instance_network=network,
        instance_bridge=bridge,
        docker_start_concurrency=2,
    )
    folder = tmp_path / "echo"
    folder.mkdir()
    (folder / "fn.py").write_text(ECHO_FN)
    runtime = await DockerRuntime.connect(settings)
    try:
        tag = await runtime.prepare("turns", 1, folder, Manifest(), docker_cleanup, lambda _: None)
        since = int(time.time()) - 1
        handles: list[str] = []

        async def start(slot: int) -> None:
            spec = InstanceSpec(
                function="turns",
                version=1,
                slot=slot,
                instance_id=uuid.uuid4().hex[:8],
                artifact=tag,
                manifest=Manifest(),
                owner=docker_cleanup,
            )
            handles.append((await runtime.start(spec)).handle)

        async with anyio.create_task_group() as tg:
            for slot in range(6):
                tg.start_soon(start, slot)
        until = int(time.time()) + 2
        owned = {
            "type": ["container"],
            "event": ["create", "start"],
            "label": [f"{names.LABEL_OWNER}={docker_cleanup}"],
        }

        def read_events() -> list[tuple[int, str]]:
            events = docker_client.api.events(since=since, until=until, decode=True, filters=owned)
            return sorted((e["timeNano"], e["Action"]) for e in events)

        timeline = await anyio.to_thread.run_sync(read_events)
        for handle in handles:
            await runtime.stop(handle)
    finally:
        await runtime.close()
    between = most = 0
    for _, action in timeline:
        between += 1 if action == "create" else -1
        most = max(most, between)
    print(f"six starts, two at a time: at most {most} containers between create and start")
    assert len(timeline) == 12
    assert most <= 2


CRASHING_FN = """\
import os

if os.environ.get("AUBE_INSTANCE_ID"):
    os._exit(3)  # dies on every instance start (the build does not import it)


def fn(websocket):
    pass
"""


async def test_a_server_that_dies_at_once_gives_its_turn_back(
    instance_network: tuple[str, str], docker_cleanup: str, docker_client: Any, tmp_path: Path
) -> None:
    """A turn lasts until the server listens, 10 s at most; a container that died gives it back within a second or
    two, so a function that crashes on start does not hold up the next start (one at a time here) for 10 s."""
    network, bridge = instance_network
    settings = ControlPlaneSettings(
        owner=docker_cleanup,
        data_dir=str(tmp_path / "data"),
        health_timeout=15.0,
        instance_network=network,
        instance_bridge=bridge,
        docker_start_concurrency=1,
    )
    runtime = await DockerRuntime.connect(settings)
    try:
        tags = {}
        for function, source in (("crash", CRASHING_FN), ("fine", ECHO_FN)):
            folder = tmp_path / function
            folder.mkdir()
            (folder / "fn.py").write_text(source)
            tags[function] = await runtime.prepare(function, 1, folder, Manifest(), docker_cleanup, lambda _: None)
        since = int(time.time()) - 1
        handles: list[str] = []

        async def start(function: str) -> None:
            spec = InstanceSpec(
                function=function,
                version=1,
                slot=0,
                instance_id=uuid.uuid4().hex[:8],
                artifact=tags[function],
                manifest=Manifest(),
                owner=docker_cleanup,
            )
            handles.append((await runtime.start(spec)).handle)

        async with anyio.create_task_group() as tg:
            tg.start_soon(start, "crash")
            await anyio.sleep(0.3)  # the crashing one takes the only turn first
            tg.start_soon(start, "fine")
        until = int(time.time()) + 2
        owned = {"type": ["container"], "event": ["create", "die"], "label": [f"{names.LABEL_OWNER}={docker_cleanup}"]}

        def read_events() -> dict[tuple[str, str], float]:
            events = docker_client.api.events(since=since, until=until, decode=True, filters=owned)
            return {(e["Actor"]["Attributes"][names.LABEL_FUNCTION], e["Action"]): e["timeNano"] / 1e9 for e in events}

        times = await anyio.to_thread.run_sync(read_events)
        for handle in handles:
            await runtime.stop(handle)
    finally:
        await runtime.close()
    gap = times[("fine", "create")] - times[("crash", "die")]
    print(f"the next start was created {gap:.1f}s after the crashed server's container died")
    assert gap < 5.0
