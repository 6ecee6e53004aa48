"""The process runtime with real processes: prepare, start, stream through a real websockets client, find, stop.

Every test gets its own owner and data dir; the fixture stops whatever instance of that owner still runs.
Sandbox tests skip where bubblewrap does not work (they are the point of the runtime on such a machine, so the
skip says why).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from support import instance_ws

from aube.controlplane.runtimes import cgroups, sandbox
from aube.controlplane.runtimes.base import InstanceSpec, StartedInstance
from aube.controlplane.runtimes.process import ProcessRuntime
from aube.shared import addresses, names
from aube.shared.errors import BuildFailed, RuntimeFailure
from aube.shared.schemas import LimitsSection, Manifest
from aube.shared.settings import ControlPlaneSettings

pytestmark = pytest.mark.anyio

ECHO = """
import resource


async def fn(websocket):
    async for message in websocket:
        if message == "limits":
            await websocket.send(str(resource.getrlimit(resource.RLIMIT_AS)[0]))
        else:
            await websocket.send(message)
"""

# Replies with where websockets was imported from: the function's deps folder comes first on sys.path.
WITH_REQUIREMENTS = """
import websockets


async def fn(websocket):
    async for message in websocket:
        await websocket.send(websockets.__file__)
"""

WRITER = """
import os


def attempt(path):
    try:
        with open(path, "w") as f:
            f.write("x")
    except OSError as e:
        return f"error {e.errno}"
    return "wrote"


async def fn(websocket):
    async for message in websocket:
        here = os.path.dirname(os.path.abspath(__file__))
        await websocket.send(
            {
                "own_folder": attempt(os.path.join(here, "written.txt")),
                "deps": attempt(os.path.join(os.environ["PYTHONPATH"], "written.txt")),
                "tmp": attempt("/tmp/written.txt"),
            }[message]
        )
"""

BROKEN = """
raise RuntimeError("boom at import time")
"""


def _bwrap_works() -> bool:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return False
    return subprocess.run(sandbox.probe_argv(bwrap), capture_output=True, check=False).returncode == 0


BWRAP = _bwrap_works()
needs_bwrap = pytest.mark.skipif(not BWRAP, reason="bubblewrap is missing or cannot create namespaces here")


def _function(root: Path, source: str, requirements: str | None = None) -> Path:
    folder = root / f"src-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    (folder / "fn.py").write_text(textwrap.dedent(source))
    if requirements is not None:
        (folder / "requirements.txt").write_text(requirements)
    return folder


def _settings(tmp_path: Path, mode: str) -> ControlPlaneSettings:
    return ControlPlaneSettings(data_dir=str(tmp_path / "data"), sandbox="bwrap" if mode == "bwrap" else "none")


def _spec(ref: str, owner: str, name: str = "echo", *, slot: int = 0, version: int = 1) -> InstanceSpec:
    return InstanceSpec(
        function=name,
        version=version,
        slot=slot,
        instance_id=uuid.uuid4().hex[:12],
        artifact=ref,
        manifest=Manifest(),
        owner=owner,
    )


async def _stop_all(runtime: ProcessRuntime, owner: str) -> None:
    for instance in await runtime.instances(owner):
        await runtime.stop(instance.handle)


@asynccontextmanager
async def _runtime(tmp_path: Path, mode: str, owner: str) -> AsyncIterator[ProcessRuntime]:
    rt = ProcessRuntime(_settings(tmp_path, mode))
    try:
        yield rt
    finally:
        with anyio.move_on_after(30, shield=True):
            await _stop_all(rt, owner)
        await rt.close()


@pytest.fixture(params=["none", pytest.param("bwrap", marks=needs_bwrap)])
async def runtime(request: pytest.FixtureRequest, tmp_path: Path, test_owner: str) -> AsyncIterator[ProcessRuntime]:
    async with _runtime(tmp_path, request.param, test_owner) as rt:
        yield rt


@pytest.fixture
async def bwrap_runtime(tmp_path: Path, test_owner: str) -> AsyncIterator[ProcessRuntime]:
    if not BWRAP:
        pytest.skip("bubblewrap is missing or cannot create namespaces here")
    async with _runtime(tmp_path, "bwrap", test_owner) as rt:
        yield rt


async def _health(address: str) -> bytes:
    async with await addresses.connect_stream(address) as stream:
        await stream.send(f"GET {names.INSTANCE_HEALTH_PATH} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        with anyio.fail_after(10):
            while b"\r\n" not in data:
                data += await stream.receive()
    return data.split(b"\r\n", 1)[0]


async def _ask(instance: StartedInstance, message: str) -> str:
    with anyio.fail_after(20):
        async with instance_ws(instance.address) as ws:
            await ws.send(message)
            reply = await ws.recv()
    assert isinstance(reply, str)
    return reply


def _process_exists(pid: int) -> bool:
    """True while /proc knows the pid at all, zombies included."""
    return Path(f"/proc/{pid}").exists()


async def test_start_stream_find_stop(runtime: ProcessRuntime, tmp_path: Path, test_owner: str) -> None:
    ref = await runtime.prepare("echo", 1, _function(tmp_path, ECHO), Manifest(), test_owner, lambda _: None)
    assert (Path(ref) / "fn" / "fn.py").is_file()
    assert Path(ref) == Path(tmp_path, "data", "functions", test_owner, "echo", "v1")

    spec = _spec(ref, test_owner, slot=3)
    started = await runtime.start(spec)
    assert started.instance_id == spec.instance_id
    # Sandboxed: a Unix socket (the instance has no network the host reaches); else a loopback port.
    assert started.address.startswith("unix:" if runtime._bwrap else "127.0.0.1:")
    assert await _health(started.address) == b"HTTP/1.1 200 OK"
    assert await _ask(started, "hello") == "hello"
    # The manifest's memory (256m by default) reaches the function as its address-space limit.
    assert await _ask(started, "limits") == str(256 * 1024**2)

    (found,) = await runtime.instances(test_owner)
    assert (found.handle, found.instance_id, found.function, found.version, found.slot, found.alive) == (
        started.handle,
        spec.instance_id,
        "echo",
        1,
        3,
        True,
    )
    assert await runtime.instances(f"{test_owner}x") == []
    assert await runtime.is_alive(started.handle)

    await runtime.stop(started.handle)
    pid, _ = sandbox.parse_handle(started.handle)
    assert not _process_exists(pid)  # gone, and reaped: no zombie either
    assert not await runtime.is_alive(started.handle)
    assert await runtime.instances(test_owner) == []
    await runtime.stop(started.handle)  # a missing instance is not an error
    assert not list((tmp_path / "data" / "logs" / test_owner).iterdir())  # its log went with it


async def test_requirements_on_the_path(bwrap_runtime: ProcessRuntime, tmp_path: Path, test_owner: str) -> None:
    source = _function(tmp_path, WITH_REQUIREMENTS, requirements="websockets>=12.0\n")
    lines: list[str] = []
    ref = await bwrap_runtime.prepare("reqs", 1, source, Manifest(), test_owner, lines.append)
    assert any("installing requirements" in line for line in lines)
    assert list((Path(ref) / "deps").glob("websockets*"))
    started = await bwrap_runtime.start(_spec(ref, test_owner, "reqs"))
    reply = await _ask(started, "where")
    assert reply.startswith(f"{sandbox.SANDBOX_DEPS_DIR}/websockets/")


async def test_sandbox_is_read_only_outside_tmp(bwrap_runtime: ProcessRuntime, tmp_path: Path, test_owner: str) -> None:
    ref = await bwrap_runtime.prepare("writer", 1, _function(tmp_path, WRITER), Manifest(), test_owner, print)
    started = await bwrap_runtime.start(_spec(ref, test_owner, "writer"))
    erofs = f"error {30}"  # EROFS: the function's own folder and its deps are read-only binds
    assert await _ask(started, "own_folder") == erofs
    assert await _ask(started, "deps") == erofs
    assert await _ask(started, "tmp") == "wrote"
    assert not await anyio.Path(ref, "fn", "written.txt").exists()
    assert not await anyio.Path(ref, "deps", "written.txt").exists()
    assert not await anyio.Path("/tmp/written.txt").exists()  # the sandbox's /tmp is its own


async def test_process_that_dies_at_once(runtime: ProcessRuntime, tmp_path: Path, test_owner: str) -> None:
    ref = await runtime.prepare("broken", 1, _function(tmp_path, BROKEN), Manifest(), test_owner, print)
    with pytest.raises(RuntimeFailure, match="boom at import time"):
        await runtime.start(_spec(ref, test_owner, "broken"))
    assert await runtime.instances(test_owner) == []
    assert not list((tmp_path / "data" / "logs" / test_owner).iterdir())


async def test_prepare_failure_leaves_nothing(tmp_path: Path, test_owner: str) -> None:
    runtime = ProcessRuntime(_settings(tmp_path, "none"))
    # Not a requirement at all: pip refuses it without asking an index.
    source = _function(tmp_path, ECHO, requirements="this is not a requirement!!!\n")
    with pytest.raises(BuildFailed, match="could not be installed"):
        await runtime.prepare("bad", 1, source, Manifest(), test_owner, lambda _: None)
    assert list((tmp_path / "data" / "functions" / test_owner / "bad").iterdir()) == []
    assert await runtime.artifacts(test_owner) == []

    bad = Manifest(limits=LimitsSection(memory="plenty"))
    with pytest.raises(BuildFailed, match=r"limits\.memory"):
        await runtime.prepare("bad", 2, _function(tmp_path, ECHO), bad, test_owner, lambda _: None)
    await runtime.close()


async def test_artifacts_listed_and_removed(tmp_path: Path, test_owner: str) -> None:
    runtime = ProcessRuntime(_settings(tmp_path, "none"))
    source = _function(tmp_path, ECHO)
    first = await runtime.prepare("echo", 1, source, Manifest(), test_owner, lambda _: None)
    second = await runtime.prepare("echo", 2, source, Manifest(), test_owner, lambda _: None)
    other = await runtime.prepare("other", 1, source, Manifest(), test_owner, lambda _: None)
    listed = {(a.ref, a.function, a.version) for a in await runtime.artifacts(test_owner)}
    assert listed == {(first, "echo", 1), (second, "echo", 2), (other, "other", 1)}
    assert await runtime.artifacts(f"{test_owner}x") == []

    await runtime.remove_artifact(first)
    await runtime.remove_artifact(first)  # missing is fine
    assert not await anyio.Path(first).exists()
    assert {a.ref for a in await runtime.artifacts(test_owner)} == {second, other}
    with pytest.raises(RuntimeFailure):
        await runtime.remove_artifact(str(tmp_path))  # never anything outside its own folders
    assert await anyio.Path(tmp_path).exists()
    await runtime.close()


# A control plane in a process of its own: it starts one instance, prints it, then waits to be killed.
CONTROL_PLANE = """
import json, sys, anyio
from pathlib import Path
from aube.controlplane.runtimes.base import InstanceSpec
from aube.controlplane.runtimes.process import ProcessRuntime
from aube.shared.schemas import LimitsSection, Manifest
from aube.shared.settings import ControlPlaneSettings

async def main():
    data_dir, source, owner = sys.argv[1:4]
    rt = ProcessRuntime(ControlPlaneSettings(data_dir=data_dir, sandbox="bwrap"))
    ref = await rt.prepare("echo", 1, Path(source), Manifest(), owner, lambda _: None)
    spec = InstanceSpec(function="echo", version=1, slot=0, instance_id="survivor", artifact=ref,
                        manifest=Manifest(), owner=owner)
    started = await rt.start(spec)
    print(json.dumps({"handle": started.handle, "address": started.address}), flush=True)
    await anyio.sleep_forever()

anyio.run(main)
"""

PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture
def child_subreaper() -> Iterator[None]:
    """Make this test process adopt orphaned descendants, as the init of a real machine reaps them.

    Without it the orphaned instance would be re-parented to this machine's pid 1, which reaps nobody, and
    leave a zombie no test can collect.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip(f"prctl(PR_SET_CHILD_SUBREAPER) failed: errno {ctypes.get_errno()}")
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@pytest.mark.usefixtures("child_subreaper")
async def test_instance_survives_kill_9_of_control_plane(
    bwrap_runtime: ProcessRuntime, tmp_path: Path, test_owner: str
) -> None:
    data_dir = tmp_path / "data"
    source = _function(tmp_path, ECHO)
    argv = [sys.executable, "-c", CONTROL_PLANE, str(data_dir), str(source), test_owner]
    async with await anyio.open_process(argv, stderr=None) as cp:
        try:
            assert cp.stdout is not None
            with anyio.fail_after(60):
                line = await BufferedByteReceiveStream(cp.stdout).receive_until(b"\n", 4096)
            started = StartedInstance(instance_id="survivor", **json.loads(line))
        finally:
            cp.send_signal(signal.SIGKILL)
            await cp.wait()

    # After the crash: the instance still serves, and a fresh runtime (as after a restart) finds it.
    assert await _ask(started, "still here") == "still here"
    (found,) = await bwrap_runtime.instances(test_owner)
    assert (found.handle, found.instance_id, found.alive) == (started.handle, "survivor", True)
    assert await bwrap_runtime.is_alive(found.handle)

    await bwrap_runtime.stop(found.handle)
    pid, _ = sandbox.parse_handle(found.handle)
    assert not _process_exists(pid)
    assert await bwrap_runtime.instances(test_owner) == []
    # Nothing of the instance (nor of the crashed control plane's bwrap probe) was orphaned to this adopter.
    assert _adopted_zombies() == []


def _adopted_zombies() -> list[str]:
    zombies = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = sandbox.parse_stat(Path(f"/proc/{entry}/stat").read_text())
            except (OSError, ValueError, IndexError):
                continue
            if stat.ppid == os.getpid() and stat.state == "Z":
                zombies.append(Path(f"/proc/{entry}/stat").read_text()[:40])
    return zombies


async def test_required_sandbox_missing_is_a_clear_failure(
    tmp_path: Path, test_owner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = ProcessRuntime(_settings(tmp_path, "bwrap"))
    ref = await runtime.prepare("echo", 1, _function(tmp_path, ECHO), Manifest(), test_owner, lambda _: None)
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    with pytest.raises(RuntimeFailure, match="bwrap is not on PATH"):
        await runtime.start(_spec(ref, test_owner))
    assert await runtime.instances(test_owner) == []
    await runtime.close()


async def test_instances_started_at_once_each_answer_as_themselves(
    runtime: ProcessRuntime, tmp_path: Path, test_owner: str
) -> None:
    """Each instance binds its own port (the kernel picks it), so no registry entry can lead to another instance;
    the control plane's health check also asks every instance who it is."""
    from aube.controlplane.health import probe

    ref = await runtime.prepare("echo", 1, _function(tmp_path, ECHO), Manifest(), test_owner, lambda _: None)
    specs = [_spec(ref, test_owner, slot=slot) for slot in range(8)]
    started: list[StartedInstance] = []

    async def start(spec: InstanceSpec) -> None:
        started.append(await runtime.start(spec))

    async with anyio.create_task_group() as tg:
        for spec in specs:
            tg.start_soon(start, spec)
    assert len({s.address for s in started}) == 8
    for s in started:
        assert await probe(s.address, s.instance_id)
        assert not await probe(s.address, "someone-else")
        assert await _ask(s, "hello") == "hello"


# Starts threads until the system refuses one (or 60), and burns CPU for 1.5 s of wall time: what the limits allow.
GREEDY = """
import json
import threading
import time


def spin():
    until = time.monotonic() + 1.5
    while time.monotonic() < until:
        pass


async def fn(websocket):
    async for message in websocket:
        if message == "threads":
            stop = threading.Event()
            started = 0
            try:
                for _ in range(60):
                    threading.Thread(target=stop.wait, daemon=True).start()
                    started += 1
            except RuntimeError:  # "can't start new thread": pids.max reached
                pass
            stop.set()
            await websocket.send(str(started))
        else:
            wall, cpu = time.monotonic(), time.process_time()
            spin()
            await websocket.send(json.dumps((time.process_time() - cpu) / (time.monotonic() - wall)))
"""


def _cgroup_of(pid: int, controller: str) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    raise AssertionError(f"process {pid} has no {controller} cgroup")


async def test_cpus_and_pids_limits_hold_through_cgroups(
    runtime: ProcessRuntime, tmp_path: Path, test_owner: str
) -> None:
    if cgroups.CgroupLimits.detect()[0] is None:
        pytest.skip(f"cgroups are not writable here: {cgroups.CgroupLimits.detect()[1]}")
    manifest = Manifest(limits=LimitsSection(cpus=0.2, pids=24, memory="512m"))
    ref = await runtime.prepare("greedy", 1, _function(tmp_path, GREEDY), manifest, test_owner, lambda _: None)
    spec = _spec(ref, test_owner, "greedy")
    spec = InstanceSpec(**{**{f: getattr(spec, f) for f in spec.__struct_fields__}, "manifest": manifest})
    started = await runtime.start(spec)
    pid, _ = sandbox.parse_handle(started.handle)
    # Below this process's own group in each hierarchy: a service manager's accounting still covers instances.
    own = cgroups.own_groups(Path("/proc/self/cgroup").read_text())
    groups = {c: f"{own[c].rstrip('/')}/{cgroups.GROUP}/{test_owner}/{spec.instance_id}" for c in cgroups.CONTROLLERS}
    for controller, group in groups.items():
        assert _cgroup_of(pid, controller) == group
    root = cgroups.CGROUP_ROOT
    assert (root / "pids" / groups["pids"].lstrip("/") / "pids.max").read_text().strip() == "24"
    memory_limit = root / "memory" / groups["memory"].lstrip("/") / "memory.limit_in_bytes"
    assert memory_limit.read_text().strip() == str(512 * 1024**2)

    # The server's own threads count too, so the function gets fewer than 24 of its 60; unlimited, it gets 60.
    assert int(await _ask(started, "threads")) < 24
    # 0.2 of a core: the quota can only lower this ratio (a busy machine lowers it further), never raise it.
    assert json.loads(await _ask(started, "spin")) < 0.35

    await runtime.stop(started.handle)
    assert not any((root / c / g.lstrip("/")).exists() for c, g in groups.items())  # they go with the instance


async def test_a_listing_that_began_before_a_start_leaves_the_new_instance_alone(
    bwrap_runtime: ProcessRuntime, tmp_path: Path, test_owner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing whose process scan ran before an instance was spawned does not see it; it must not take that
    instance's socket folder for a leftover. Seen in a full run: the folder went while bubblewrap was about to bind
    it ("Can't bind mount ... No such file or directory") and the upload failed."""
    from aube.controlplane.runtimes import leaders

    ref = await bwrap_runtime.prepare("echo", 1, _function(tmp_path, ECHO), Manifest(), test_owner, lambda _: None)
    scanned, release = anyio.Event(), anyio.Event()
    real_scan = leaders.scan_leaders

    def held_scan() -> object:
        snapshot = real_scan()
        anyio.from_thread.run_sync(scanned.set)
        anyio.from_thread.run(release.wait)  # the listing goes on only after the start below has spawned
        return snapshot

    monkeypatch.setattr(leaders, "scan_leaders", held_scan)
    async with anyio.create_task_group() as tg:
        tg.start_soon(bwrap_runtime.instances, test_owner)
        await scanned.wait()
        monkeypatch.setattr(leaders, "scan_leaders", real_scan)
        started = await bwrap_runtime.start(_spec(ref, test_owner))
        release.set()
    assert await _ask(started, "still here") == "still here"
    assert [i.instance_id for i in await bwrap_runtime.instances(test_owner)] == [started.instance_id]
