"""`Runtime.watch_exits` on its own: the Docker engine's die events and the process runtime's pidfds, against real
containers and processes killed with SIGKILL (the control plane's reaction is tested in tests/faults)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from aube.controlplane.runtimes import sandbox
from aube.controlplane.runtimes.leaders import ExitWatch, read_stat
from aube.controlplane.runtimes.process import ProcessRuntime
from aube.shared import names
from aube.shared.settings import DEFAULT_BASE_IMAGE, ControlPlaneSettings

pytestmark = pytest.mark.anyio

BOUND = 5.0  # generous on a shared machine; each test prints what it measured


async def wait_reported(reported: list[str], handle: str, began: float) -> float:
    with anyio.fail_after(BOUND):
        while handle not in reported:
            await anyio.sleep(0.005)
    return time.monotonic() - began


@pytest.mark.docker
async def test_docker_reports_the_owners_killed_containers_and_no_one_elses(
    docker_client: Any, docker_cleanup: str, tmp_path: Path
) -> None:
    from aube.controlplane.runtimes.docker import DockerRuntime

    runtime = await DockerRuntime.connect(ControlPlaneSettings(owner=docker_cleanup, data_dir=str(tmp_path)))
    other = f"{docker_cleanup}-other"

    def sleeper(owner: str) -> Any:
        labels = {names.LABEL_MANAGED: "true", names.LABEL_OWNER: owner, names.LABEL_TEST: "1"}
        return docker_client.containers.run(DEFAULT_BASE_IMAGE, ["sleep", "300"], labels=labels, detach=True)

    mine, foreign = sleeper(docker_cleanup), sleeper(other)
    reported: list[str] = []
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(runtime.watch_exits, docker_cleanup, reported.append)
            await anyio.sleep(1)  # the stream is open
            await anyio.to_thread.run_sync(foreign.kill)
            began = time.monotonic()
            await anyio.to_thread.run_sync(mine.kill)
            took = await wait_reported(reported, mine.id, began)
            print(f"[docker] die event of a killed container reported after {took * 1000:.0f} ms")
            await anyio.sleep(0.5)
            assert reported == [mine.id]  # the other owner's container is not this watch's business
            cancelled = time.monotonic()
            tg.cancel_scope.cancel()
        # The reader thread blocks in a read: cancelling closes the stream instead of waiting for the next event.
        ended = time.monotonic() - cancelled
        print(f"[docker] the watch ended {ended * 1000:.0f} ms after its cancellation")
        assert ended < BOUND
    finally:
        foreign.remove(force=True)
        await runtime.close()


@pytest.mark.docker
async def test_docker_reports_an_exit_that_happened_while_its_event_stream_was_down(
    docker_client: Any, docker_cleanup: str, tmp_path: Path
) -> None:
    from aube.controlplane.runtimes.docker import DockerRuntime

    runtime = await DockerRuntime.connect(ControlPlaneSettings(owner=docker_cleanup, data_dir=str(tmp_path)))
    labels = {names.LABEL_MANAGED: "true", names.LABEL_OWNER: docker_cleanup, names.LABEL_TEST: "1"}
    victim = docker_client.containers.run(DEFAULT_BASE_IMAGE, ["sleep", "300"], labels=labels, detach=True)
    # The engine's first stream ends at once (as when the engine restarts); the watch opens another.
    real_events = runtime._client.api.events
    since: list[object] = []

    def events(**kwargs: Any) -> Any:
        since.append(kwargs.get("since"))
        return iter(()) if len(since) == 1 else real_events(**kwargs)

    runtime._client.api.events = events
    reported: list[str] = []
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(runtime.watch_exits, docker_cleanup, reported.append)
            with anyio.fail_after(BOUND):
                while not since:
                    await anyio.sleep(0.01)
            began = time.monotonic()
            await anyio.to_thread.run_sync(victim.kill)  # while no stream is open
            took = await wait_reported(reported, victim.id, began)
            print(f"[docker] an exit during a stream outage reported after {took * 1000:.0f} ms (on reconnect)")
            tg.cancel_scope.cancel()
        assert since[0] is None and isinstance(since[1], int)
    finally:
        await runtime.close()


def sleeper_handle(proc_pid: int) -> str:
    stat = read_stat(proc_pid)
    assert stat is not None
    return sandbox.format_handle(proc_pid, stat.starttime)


async def test_a_pidfd_reports_children_adopted_processes_and_processes_already_gone(tmp_path: Path) -> None:
    reported: list[str] = []
    watch = ExitWatch(__import__("asyncio").get_running_loop(), reported.append)
    child = subprocess.Popen(["sleep", "300"], start_new_session=True)
    # Not our child: started by a shell that exits at once, like an instance left by a control plane that died.
    orphan_pid = int(subprocess.check_output(["sh", "-c", "setsid sleep 300 >/dev/null 2>&1 & echo $!"]).strip())
    try:
        handles = {"child": sleeper_handle(child.pid), "orphan": sleeper_handle(orphan_pid)}
        for handle in handles.values():
            watch.add(handle)
        kills: list[tuple[str, Callable[[], None]]] = [
            ("child", lambda: os.kill(child.pid, signal.SIGKILL)),
            ("orphan", lambda: os.kill(orphan_pid, signal.SIGKILL)),
        ]
        for what, kill in kills:
            began = time.monotonic()
            kill()
            took = await wait_reported(reported, handles[what], began)
            print(f"[process] pidfd of a killed {what} reported after {took * 1000:.1f} ms")
        assert child.poll() is not None  # our child is reaped at once: no zombie until the next pass
        # A handle whose process is gone (or whose pid now names another process) is reported at once.
        gone = sandbox.format_handle(child.pid, 1)
        watch.add(gone)
        recycled = sandbox.format_handle(os.getpid(), 1)
        watch.add(recycled)
        await wait_reported(reported, gone, time.monotonic())
        await wait_reported(reported, recycled, time.monotonic())
    finally:
        watch.close()
        for pid in (child.pid, orphan_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        child.wait()


async def test_the_process_runtime_refuses_a_second_watch_of_one_owner(tmp_path: Path) -> None:
    from aube.shared.errors import RuntimeFailure

    runtime = ProcessRuntime(ControlPlaneSettings(owner="w1", data_dir=str(tmp_path)))
    async with anyio.create_task_group() as tg:
        tg.start_soon(runtime.watch_exits, "w1", lambda handle: None)
        await anyio.sleep(0.2)
        with pytest.raises(RuntimeFailure):
            await runtime.watch_exits("w1", lambda handle: None)
        tg.cancel_scope.cancel()
    await runtime.close()
