"""Process instances forked from a per-version zygote (issue 11, item 4), with real bubblewrap and real instances.

What a fork must keep from a fresh sandboxed interpreter: its own namespaces, uid, seccomp, cgroups and socket
folder (the attacks of test_process_sandbox.py run against forked instances too, the zygote being on by default),
and nothing of another instance: not the function's state, not a secret. A zygote that is gone is replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from support import instance_ws, nats_client, zip_base64
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from aube.controlplane.runtimes import sandbox, seccomp, zygotes
from aube.controlplane.runtimes.base import InstanceSpec, StartedInstance
from aube.controlplane.runtimes.process import ProcessRuntime
from aube.shared import addresses, names
from aube.shared.bus import request
from aube.shared.schemas import Manifest, UploadReply, UploadRequest
from aube.shared.settings import ControlPlaneSettings

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ZYGOTE_MODULE = "aube.controlplane.runtimes.zygote"

# State the function leaves behind, at import and during a stream; each message asks for one report.
STATEFUL = r"""
import json
import os
import random
import socket

IMPORTED_IN = os.getpid()
with open("/tmp/imports", "a") as f:  # its writable folder: one line per import this sandbox has seen
    f.write("imported\n")
STATE = {"dirty": False}


def fd_target(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "gone"


def report():
    with open("/tmp/imports") as f:
        imports = f.read().count("imported")
    return {
        "dirty": STATE["dirty"],
        "imports": imports,
        "left_behind": os.path.exists("/tmp/left-behind"),
        "random": random.random(),
        "urandom": os.urandom(8).hex(),
        "secret_sha256": os.environ.get("AUBE_INSTANCE_SECRET_SHA256", ""),
        "instance": os.environ.get("AUBE_INSTANCE_ID", ""),
        "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "fds": sorted(fd_target(fd) for fd in os.listdir("/proc/self/fd")),
        "uid": os.getuid(),
    }


def attempt(op, arg):
    try:
        if op == "listdir":
            return sorted(os.listdir(arg))
        if op == "unix":
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(2)
            try:
                s.connect(arg)
            finally:
                s.close()
            return "connected"
        if op == "exit":
            os._exit(3)
        if op == "kill":
            os.kill(int(arg), 0)
            return "ok"
    except OSError as e:
        return f"error {e.errno}"
    return "unknown op"


async def fn(websocket):
    async for message in websocket:
        request = json.loads(message)
        if request["op"] == "dirty":
            STATE["dirty"] = True
            open("/tmp/left-behind", "w").close()
            random.seed(42)
            await websocket.send(json.dumps("ok"))
        elif request["op"] == "report":
            await websocket.send(json.dumps(report()))
        else:
            await websocket.send(json.dumps(attempt(request["op"], request.get("arg"))))
"""


def _bwrap_works() -> bool:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return False
    return subprocess.run(sandbox.probe_argv(bwrap), capture_output=True, check=False).returncode == 0


needs_zygote = pytest.mark.skipif(
    not _bwrap_works() or os.geteuid() != 0, reason="the zygote needs bubblewrap and a root control plane"
)


@asynccontextmanager
async def _runtime(tmp_path: Path, owner: str, zygote: str = "on") -> AsyncIterator[ProcessRuntime]:
    settings = ControlPlaneSettings(data_dir=str(tmp_path / f"data-{zygote}"), sandbox="bwrap", zygote=zygote)  # type: ignore[arg-type]
    rt = ProcessRuntime(settings)
    try:
        yield rt
    finally:
        with anyio.move_on_after(30, shield=True):
            for instance in await rt.instances(owner):
                await rt.stop(instance.handle)
        await rt.close()


async def _prepare(rt: ProcessRuntime, tmp_path: Path, owner: str, code: str = STATEFUL) -> str:
    folder = tmp_path / f"src-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    (folder / "fn.py").write_text(textwrap.dedent(code))
    return await rt.prepare("stateful", 1, folder, Manifest(), owner, lambda _: None)


async def _start(rt: ProcessRuntime, ref: str, owner: str, slot: int) -> tuple[StartedInstance, str]:
    secret = uuid.uuid4().hex
    spec = InstanceSpec(
        function="stateful",
        version=1,
        slot=slot,
        instance_id=uuid.uuid4().hex[:12],
        artifact=ref,
        manifest=Manifest(),
        owner=owner,
        secret=secret,
    )
    return await rt.start(spec), secret


async def _ask(instance: StartedInstance, secret: str, *messages: dict[str, object]) -> list[object]:
    with anyio.fail_after(20):
        async with instance_ws(instance.address, secret=secret) as ws:
            replies = []
            for message in messages:
                await ws.send(json.dumps(message))
                replies.append(json.loads(await ws.recv()))
            return replies


def _sandbox_pids(handle: str) -> list[int]:
    """The instance's processes as the host sees them: below its bubblewrap leader, and in the same pid namespace
    as those (an instance forked from a zygote is no descendant of bubblewrap)."""
    leader, _ = sandbox.parse_handle(handle)
    stats = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stats.append(sandbox.parse_stat(Path(f"/proc/{entry}/stat").read_text()))
            except (OSError, ValueError, IndexError):
                continue
    below = [s.pid for s in sandbox.descendants(stats, leader)]
    namespaces = {}
    for stat in stats:
        try:
            namespaces[stat.pid] = os.readlink(f"/proc/{stat.pid}/ns/pid")
        except OSError:
            continue
    return below + sandbox.namespace_members(namespaces, below, os.readlink("/proc/self/ns/pid"))


def _server_process(handle: str) -> tuple[int, str]:
    """The instance's Python in its sandbox: (host pid, command line)."""
    for pid in _sandbox_pids(handle):
        cmdline = _safe_cmdline(pid)
        if "python" in cmdline:
            return pid, cmdline
    raise AssertionError(f"no Python in the sandbox of {handle}")


def _uid(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Uid:"))
    return int(line.split()[1])


def _cgroup(pid: int, controller: str) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if controller in line.split(":")[1].split(","):
            return line.split(":", 2)[2]
    return ""


@needs_zygote
async def test_a_forked_instance_runs_in_its_own_sandbox_and_groups(tmp_path: Path, test_owner: str) -> None:
    async with _runtime(tmp_path, test_owner) as rt:
        ref = await _prepare(rt, tmp_path, test_owner)
        started, secret = await _start(rt, ref, test_owner, 0)
        pid, cmdline = _server_process(started.handle)
        assert ZYGOTE_MODULE in cmdline  # forked, not a fresh interpreter
        assert _uid(pid) == 65534
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        assert os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
        assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
        status = Path(f"/proc/{pid}/status").read_text()
        assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status and "CapEff:\t0000000000000000" in status
        assert "CapBnd:\t0000000000000000" in status
        zygote = rt._zygotes.pid(ref)
        assert zygote is not None
        if Path("/sys/fs/cgroup/pids/cgroup.procs").exists():
            assert _cgroup(pid, "pids").endswith(f"/aube/{test_owner}/{started.instance_id}")
            assert _cgroup(pid, "pids") != _cgroup(zygote, "pids")
        (report,) = await _ask(started, secret, {"op": "report"})
        assert isinstance(report, dict)
        # Its pid namespace holds the holder (pid 1) and itself: no zygote, no other instance, no host process.
        assert len(report["pids"]) <= 3 and 1 in report["pids"]
        assert report["uid"] == 65534
        # Nothing of the zygote's: its channel (a socket), the filter's memfd, a host folder. What is there: stdin,
        # the log, the sandbox's keepalive and the server's stop pipe, its event loop (a socket pair), its listener,
        # its handoff listener (where a proxy of this host hands over clients' sockets) and this stream.
        fds = report["fds"]
        assert not [fd for fd in fds if "seccomp" in fd or "/functions/" in fd or "/run/" in fd], fds
        assert len({fd for fd in fds if fd.startswith("pipe:")}) == 2, fds
        assert len([fd for fd in fds if fd.startswith("socket:")]) == 5, fds
        (reply,) = await _ask(started, secret, {"op": "kill", "arg": zygote})
        assert reply == "error 3"  # ESRCH: the zygote does not exist for it


@needs_zygote
async def test_nothing_of_one_instance_is_seen_by_the_next(tmp_path: Path, test_owner: str) -> None:
    async with _runtime(tmp_path, test_owner) as rt:
        ref = await _prepare(rt, tmp_path, test_owner)
        first, first_secret = await _start(rt, ref, test_owner, 0)
        before, _, after = await _ask(first, first_secret, {"op": "report"}, {"op": "dirty"}, {"op": "report"})
        assert isinstance(before, dict) and isinstance(after, dict)
        assert before["imports"] == 1 and not before["dirty"] and after["dirty"] and after["left_behind"]
        # A second instance of the same version, forked from the same zygote after the first was dirtied.
        second, second_secret = await _start(rt, ref, test_owner, 1)
        (fresh,) = await _ask(second, second_secret, {"op": "report"})
        assert isinstance(fresh, dict)
        assert fresh["imports"] == 1 and not fresh["dirty"] and not fresh["left_behind"]
        assert fresh["random"] != before["random"] and fresh["urandom"] != before["urandom"]
        # After a stop, the next start of the same slot is a fresh fork too.
        await rt.stop(first.handle)
        third, third_secret = await _start(rt, ref, test_owner, 0)
        (again,) = await _ask(third, third_secret, {"op": "report"})
        assert isinstance(again, dict)
        assert again["imports"] == 1 and not again["dirty"] and not again["left_behind"]
        assert len({before["random"], fresh["random"], again["random"]}) == 3


@needs_zygote
async def test_two_forks_have_their_own_secrets_and_socket_folders(tmp_path: Path, test_owner: str) -> None:
    async with _runtime(tmp_path, test_owner) as rt:
        ref = await _prepare(rt, tmp_path, test_owner)
        first, first_secret = await _start(rt, ref, test_owner, 0)
        second, second_secret = await _start(rt, ref, test_owner, 1)
        (a,) = await _ask(first, first_secret, {"op": "report"})
        (b,) = await _ask(second, second_secret, {"op": "report"})
        assert isinstance(a, dict) and isinstance(b, dict)
        assert a["secret_sha256"] and b["secret_sha256"] and a["secret_sha256"] != b["secret_sha256"]
        assert a["instance"] == first.instance_id and b["instance"] == second.instance_id
        # The other's secret is refused: each fork checks its own.
        with pytest.raises(Exception, match=r"403|401"):
            await _ask(first, second_secret, {"op": "report"})
        other = addresses.parse(second.address)
        assert isinstance(other, addresses.UnixAddress)
        folder = str(Path(other.path).parent)
        replies = await _ask(
            first,
            first_secret,
            {"op": "unix", "arg": other.path},
            {"op": "listdir", "arg": folder},
            {"op": "unix", "arg": "/aube/run/../../" + other.path},
            {"op": "listdir", "arg": "/aube/run"},
        )
        assert all(str(r).startswith("error") for r in replies[:3]), replies
        assert replies[3] == "error 13"  # EACCES: even its own folder is the platform's once it listens
        assert len(a["pids"]) <= 3 and len(b["pids"]) <= 3  # each sees its holder and itself, not the other


@needs_zygote
async def test_a_zygote_that_is_gone_is_replaced(tmp_path: Path, test_owner: str) -> None:
    async with _runtime(tmp_path, test_owner) as rt:
        ref = await _prepare(rt, tmp_path, test_owner)
        first, first_secret = await _start(rt, ref, test_owner, 0)
        zygote = rt._zygotes.pid(ref)
        assert zygote is not None
        os.kill(zygote, signal.SIGKILL)
        # Instances do not depend on their zygote: the first one still serves.
        (report,) = await _ask(first, first_secret, {"op": "report"})
        assert isinstance(report, dict) and report["imports"] == 1
        second, second_secret = await _start(rt, ref, test_owner, 1)
        replacement = rt._zygotes.pid(ref)
        assert replacement is not None and replacement != zygote
        assert ZYGOTE_MODULE in _server_process(second.handle)[1]
        (report,) = await _ask(second, second_secret, {"op": "report"})
        assert isinstance(report, dict) and not report["dirty"]
        # A zygote killed between two starts, while its channel still looks open, is noticed at the request.
        os.kill(replacement, signal.SIGSTOP)
        os.kill(replacement, signal.SIGKILL)
        third, third_secret = await _start(rt, ref, test_owner, 2)
        assert rt._zygotes.pid(ref) not in (None, zygote, replacement)
        (report,) = await _ask(third, third_secret, {"op": "report"})
        assert isinstance(report, dict)
        # An idle zygote is stopped; its instances go on, and the next start makes another.
        idle = rt._zygotes.pid(ref)
        await rt._zygotes.stop_idle(0)
        assert rt._zygotes.pid(ref) is None and _state(idle) == "gone"
        (report,) = await _ask(third, third_secret, {"op": "report"})
        assert isinstance(report, dict)
        await _start(rt, ref, test_owner, 3)
        assert rt._zygotes.pid(ref) not in (None, idle)


@needs_zygote
async def test_a_zygote_outlives_the_worker_thread_that_started_it() -> None:
    # The runtime starts zygotes in worker threads, which anyio retires when idle: a zygote tied to its starting
    # thread (PR_SET_PDEATHSIG) would die with it. It ends when its channel does.
    started: list[zygotes.Zygote] = []

    def start_then_leave() -> None:
        started.append(zygotes.start_zygote(seccomp.compile_bpf()))
        time.sleep(1.5)  # the zygote is serving by then; then this thread ends

    thread = threading.Thread(target=start_then_leave)
    thread.start()
    thread.join()
    (zygote,) = started
    try:
        await anyio.sleep(0.5)
        assert zygote.alive()
    finally:
        zygote.channel.close()
    with anyio.fail_after(10):
        while zygote.alive():
            await anyio.sleep(0.05)


@needs_zygote
async def test_the_sandbox_ends_with_its_forked_instance(tmp_path: Path, test_owner: str) -> None:
    async with _runtime(tmp_path, test_owner) as rt:
        ref = await _prepare(rt, tmp_path, test_owner)
        started, secret = await _start(rt, ref, test_owner, 0)
        pids = _sandbox_pids(started.handle)
        with pytest.raises(ConnectionClosed):  # the function ended its own process
            await _ask(started, secret, {"op": "exit"})
        # The holder reads end of file on the pipe only the instance held: bubblewrap and its sandbox end too.
        with anyio.fail_after(10):
            while await rt.is_alive(started.handle):
                await anyio.sleep(0.05)
        await anyio.sleep(0.2)
        assert not [pid for pid in pids if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)]
        assert await rt.instances(test_owner) == []


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "gone"


@needs_zygote
async def test_zygote_off_starts_a_fresh_interpreter(tmp_path: Path, test_owner: str) -> None:
    async with _runtime(tmp_path, test_owner, zygote="off") as rt:
        ref = await _prepare(rt, tmp_path, test_owner)
        started, secret = await _start(rt, ref, test_owner, 0)
        assert "-m aube.instance" in _server_process(started.handle)[1]
        assert rt._zygotes.pid(ref) is None
        (report,) = await _ask(started, secret, {"op": "report"})
        assert isinstance(report, dict) and report["imports"] == 1


@needs_zygote
@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_the_platform_serves_a_stream_from_a_forked_instance(platform) -> None:  # type: ignore[no-untyped-def]
    controlplane = await platform.start_controlplane()
    port, _ = await platform.start_proxy()
    async with nats_client(platform.nats_url) as (nc, _registry):
        body = UploadRequest(name="reverse", zip=zip_base64(EXAMPLES / "reverse-async"))
        await request(nc, names.SUBJECT_UPLOAD, body, UploadReply, 300)
        async with connect(f"ws://127.0.0.1:{port}/reverse", proxy=None) as ws:
            await ws.send("abc")
            assert await ws.recv() == "cba"
    assert "started zygote" in controlplane.log_path.read_text()
    forked = [
        p
        for p in os.listdir("/proc")
        if p.isdigit() and _safe_cmdline(int(p)).startswith(("python", "/")) and ZYGOTE_MODULE in _safe_cmdline(int(p))
    ]
    assert [p for p in forked if _uid(int(p)) == 65534], "no forked instance runs"


def _safe_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
