"""Attacks from inside a process-runtime instance (security issue, finding 7), with real bwrap and real instances.

An instance is hostile code. Each message asks it to try one thing and report what happened; the test then
checks from the host side that the attempt reached nothing: no port of the host's loopback (NATS, its monitoring
port, a listener holding a port with SO_REUSEPORT as the proxy does), no other instance, no host uid 0, no
mount / unshare / ptrace, no platform secret in its environment. The sandbox tests skip where bubblewrap does
not work here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from support import instance_ws, nats_client, zip_base64
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from aube.controlplane.health import probe
from aube.controlplane.runtimes import sandbox
from aube.controlplane.runtimes.base import InstanceSpec, StartedInstance
from aube.controlplane.runtimes.process import ProcessRuntime
from aube.shared import addresses, names
from aube.shared.bus import request
from aube.shared.errors import RuntimeFailure
from aube.shared.natsserver import LocalNatsServer, free_port
from aube.shared.schemas import Manifest, UploadReply, UploadRequest
from aube.shared.settings import ControlPlaneSettings

pytestmark = pytest.mark.anyio

# Each message is JSON {"op": ..., "arg": ...}; each reply a JSON string saying what happened.
ATTACKER = r"""
import ctypes
import errno
import json
import os
import socket

libc = ctypes.CDLL(None, use_errno=True)
HELD = []  # sockets kept open so a bind stays in force between messages


def failed(e):
    return f"error {errno.errorcode.get(e.errno, e.errno)}"


def call(result):
    return "ok" if result == 0 else f"error {errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno())}"


def tcp(port):
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect(("127.0.0.1", int(port)))
        return "connected"
    except OSError as e:
        return failed(e)
    finally:
        s.close()


def unix(path):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(2)
    try:
        s.connect(path)
        return "connected"
    except OSError as e:
        return failed(e)
    finally:
        s.close()


def reuseport(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind(("127.0.0.1", int(port)))
        s.listen(64)
    except OSError as e:
        s.close()
        return failed(e)
    HELD.append(s)
    return "listening"


def abstract_listen(name):
    s = socket.socket(socket.AF_UNIX)
    s.bind("\0" + name)
    s.listen(4)
    HELD.append(s)
    return "listening"


def kill(pid):
    try:
        os.kill(int(pid), 0)
        return "ok"
    except OSError as e:
        return failed(e)


def proc(pid):
    try:
        return open(f"/proc/{int(pid)}/status").read()[:40]
    except OSError as e:
        return failed(e)


def swap(target):
    # A symbolic link where the socket was: the platform, as root, would follow it.
    try:
        os.rename("/aube/run/instance.sock", "/tmp/instance.sock")
    except OSError as e:
        return failed(e)
    try:
        os.symlink(target, "/aube/run/instance.sock")
        return "swapped"
    except OSError as e:
        return failed(e)


def fds():
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # the listing's own descriptor, closed meanwhile
    return sorted(found)


def write(path):
    try:
        with open(path, "w") as f:
            f.write("x")
        return "wrote"
    except OSError as e:
        return failed(e)


OPS = {
    "tcp": tcp,
    "unix": unix,
    "abstract": lambda name: unix("\0" + name),
    "abstract_listen": abstract_listen,
    "reuseport": reuseport,
    "uid_map": lambda _: open("/proc/self/uid_map").read(),
    "uid": lambda _: str(os.getuid()),
    "env": lambda _: json.dumps(sorted(os.environ)),
    "pids": lambda _: json.dumps(sorted(int(p) for p in os.listdir("/proc") if p.isdigit())),
    "kill": kill,
    "proc": proc,
    "write": write,
    "fds": lambda _: json.dumps(fds()),
    "swap": swap,
    "mount": lambda _: call(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)),
    # CLONE_NEWUSER: what an unprivileged process may do unless the sandbox forbids it.
    "unshare": lambda _: call(libc.unshare(0x10000000)),
    "unshare_net": lambda _: call(libc.unshare(0x40000000)),
    # PTRACE_TRACEME (0): needs no permission at all, so only a filter refuses it.
    "ptrace": lambda _: call(libc.ptrace(0, 0, None, None)),
    "keyctl": lambda _: call(libc.syscall(250, 0, -1, 0)),  # keyctl(KEYCTL_GET_KEYRING_ID, thread keyring)
    "bpf": lambda _: call(libc.syscall(321, 0, None, 0)),
    "perf_event_open": lambda _: call(libc.syscall(298, None, 0, -1, -1, 0)),
}


async def fn(websocket):
    async for message in websocket:
        request = json.loads(message)
        try:
            reply = OPS[request["op"]](request.get("arg"))
        except Exception as e:
            reply = f"raised {type(e).__name__}: {e}"
        await websocket.send(json.dumps(reply))
"""

SECRET_WORDS = ("NATS", "PASSWORD", "SECRET", "TOKEN", "CREDS")


def _bwrap_works() -> bool:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return False
    return subprocess.run(sandbox.probe_argv(bwrap), capture_output=True, check=False).returncode == 0


BWRAP = _bwrap_works()


def _spec(ref: str, owner: str, *, slot: int = 0) -> InstanceSpec:
    return InstanceSpec(
        function="attacker",
        version=1,
        slot=slot,
        instance_id=uuid.uuid4().hex[:12],
        artifact=ref,
        manifest=Manifest(),
        owner=owner,
    )


@asynccontextmanager
async def _runtime(tmp_path: Path, mode: str, owner: str, zygote: str = "on") -> AsyncIterator[ProcessRuntime]:
    settings = ControlPlaneSettings(data_dir=str(tmp_path / f"data-{mode}"), sandbox=mode, zygote=zygote)  # type: ignore[arg-type]
    rt = ProcessRuntime(settings)
    try:
        yield rt
    finally:
        with anyio.move_on_after(30, shield=True):
            for instance in await rt.instances(owner):
                await rt.stop(instance.handle)
        await rt.close()


@pytest.fixture(params=["zygote", "no-zygote"])
async def bwrap_runtime(
    request: pytest.FixtureRequest, tmp_path: Path, test_owner: str
) -> AsyncIterator[ProcessRuntime]:
    """Both ways an instance gets into its sandbox (as root): forked from a zygote (the default), or a fresh
    interpreter (`AUBE_ZYGOTE=off`). Every attack below must fail either way."""
    if not BWRAP:
        pytest.skip("bubblewrap is missing or cannot create namespaces here")
    async with _runtime(tmp_path, "bwrap", test_owner, "on" if request.param == "zygote" else "off") as rt:
        yield rt


async def _start(rt: ProcessRuntime, tmp_path: Path, owner: str, *, slot: int = 0) -> StartedInstance:
    folder = tmp_path / f"src-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    (folder / "fn.py").write_text(textwrap.dedent(ATTACKER))
    ref = await rt.prepare("attacker", 1, folder, Manifest(), owner, lambda _: None)
    return await rt.start(_spec(ref, owner, slot=slot))


class Session:
    """One open stream to the attacker: `await s.try_(op, arg)` returns its report."""

    def __init__(self, ws: object) -> None:
        self.ws = ws

    async def try_(self, op: str, arg: object = None) -> str:
        await self.ws.send(json.dumps({"op": op, "arg": arg}))  # type: ignore[attr-defined]
        with anyio.fail_after(20):
            reply = json.loads(await self.ws.recv())  # type: ignore[attr-defined]
        assert isinstance(reply, str)
        return reply


@asynccontextmanager
async def _session(instance: StartedInstance) -> AsyncIterator[Session]:
    with anyio.fail_after(20):
        ws = await instance_ws(instance.address)
    try:
        yield Session(ws)
    finally:
        await ws.close()


@pytest.fixture
def reuseport_listener() -> Iterator[socket.socket]:
    """A host listener on a loopback port with SO_REUSEPORT, as the proxy holds its port."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    try:
        yield s
    finally:
        s.close()


def _instance_pids(handle: str) -> list[int]:
    """The instance's processes as the host sees them: the leader and everything below it."""
    leader, _ = sandbox.parse_handle(handle)
    stats = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stats.append(sandbox.parse_stat(Path(f"/proc/{entry}/stat").read_text()))
            except (OSError, ValueError, IndexError):
                continue
    below = [s.pid for s in sandbox.descendants(stats, leader)]
    # An instance forked from a zygote (the default as root) is in its sandbox's pid namespace, below no bwrap.
    namespaces = {}
    for stat in stats:
        with contextlib.suppress(OSError):
            namespaces[stat.pid] = os.readlink(f"/proc/{stat.pid}/ns/pid")
    return [leader, *below, *sandbox.namespace_members(namespaces, below, os.readlink("/proc/self/ns/pid"))]


def _host_uids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no Uid line for {pid}")


def _connect_as(uid: int, address: str) -> str:
    """Connect to the instance's address from a host process running as `uid`: what another local user gets."""
    target = addresses.parse(address)
    if isinstance(target, addresses.UnixAddress):
        family, where = "socket.AF_UNIX", repr(target.path)
    else:
        family, where = "socket.AF_INET", repr((target.host, target.port))
    code = (
        f"import socket\ns = socket.socket({family})\n"
        f"try:\n    s.connect({where}); print('connected')\nexcept OSError as e:\n    print(e.errno)"
    )
    out = subprocess.run(
        ["python3", "-c", code], capture_output=True, text=True, check=True, user=uid, group=uid, extra_groups=[]
    )
    return out.stdout.strip()


async def test_instance_reaches_nothing_on_the_host_network(
    bwrap_runtime: ProcessRuntime,
    tmp_path: Path,
    test_owner: str,
    nats_server: LocalNatsServer,
    reuseport_listener: socket.socket,
) -> None:
    started = await _start(bwrap_runtime, tmp_path, test_owner)
    port = reuseport_listener.getsockname()[1]
    async with _session(started) as s:
        # Whatever it binds, it binds in a network of its own: every host client still reaches the host listener.
        await s.try_("reuseport", port)
        reuseport_listener.settimeout(5)
        for _ in range(16):
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            accepted, _ = reuseport_listener.accept()
            accepted.close()
            client.close()
        assert (await s.try_("tcp", nats_server.port)).startswith("error")
        assert (await s.try_("tcp", nats_server.monitor_port)).startswith("error")
    assert started.address.startswith("unix:")


async def test_instances_cannot_reach_each_other(
    bwrap_runtime: ProcessRuntime, tmp_path: Path, test_owner: str
) -> None:
    first = await _start(bwrap_runtime, tmp_path, test_owner, slot=0)
    second = await _start(bwrap_runtime, tmp_path, test_owner, slot=1)
    second_path = addresses.parse(second.address)
    assert isinstance(second_path, addresses.UnixAddress)
    second_pids = _instance_pids(second.handle)
    name = f"aube-{uuid.uuid4().hex[:8]}"
    host_abstract = socket.socket(socket.AF_UNIX)
    host_abstract.bind("\0" + name + "-host")
    host_abstract.listen(1)
    try:
        async with _session(first) as a, _session(second) as b:
            assert await b.try_("abstract_listen", name) == "listening"
            # Abstract Unix sockets live in the network namespace: neither the other instance's nor the host's.
            assert (await a.try_("abstract", name)).startswith("error")
            assert (await a.try_("abstract", name + "-host")).startswith("error")
            assert (await a.try_("unix", second_path.path)).startswith("error")
            assert (await a.try_("unix", "/aube/run/../../" + second_path.path)).startswith("error")
            # Its own pid namespace: the other instance's processes do not exist for it.
            visible = json.loads(await a.try_("pids"))
            assert not set(visible) & set(second_pids)
            for pid in second_pids:
                assert (await a.try_("kill", pid)) in ("error ESRCH", "error EPERM")
                assert (await a.try_("proc", pid)).startswith("error")
    finally:
        host_abstract.close()


async def test_instance_runs_as_an_unprivileged_host_user(
    bwrap_runtime: ProcessRuntime, tmp_path: Path, test_owner: str
) -> None:
    started = await _start(bwrap_runtime, tmp_path, test_owner)
    sandboxed = 0
    for pid in _instance_pids(started.handle):
        assert 0 not in _host_uids(pid), f"process {pid} of the instance runs as host root"
        if os.readlink(f"/proc/{pid}/ns/user") == os.readlink("/proc/self/ns/user"):
            continue  # bubblewrap's outer process, in the host's user namespace (its uid is checked above)
        # Read from the host, the map names host uids: root (0) is never mapped into the sandbox.
        for line in Path(f"/proc/{pid}/uid_map").read_text().splitlines():
            _, outside, count = (int(x) for x in line.split())
            assert not outside <= 0 < outside + count, f"uid_map of {pid} maps host root: {line!r}"
        sandboxed += 1
    assert sandboxed
    async with _session(started) as s:
        assert await s.try_("mount") == "error EPERM"
        assert await s.try_("unshare") == "error EPERM"
        assert await s.try_("unshare_net") == "error EPERM"
        assert await s.try_("ptrace") == "error EPERM"
        assert await s.try_("keyctl") == "error EPERM"
        assert await s.try_("bpf") == "error EPERM"
        assert await s.try_("perf_event_open") == "error EPERM"
        # Nothing of the platform's was inherited: not the filter's memfd, no folder of the host.
        inherited = json.loads(await s.try_("fds"))
        assert not [fd for fd in inherited if "aube-seccomp" in fd or "/functions/" in fd or "/run/" in fd]
        # Its own folder and requirements stay read-only, also for its own uid.
        assert (await s.try_("write", f"{sandbox.SANDBOX_FN_DIR}/fn.py")).startswith("error")
        assert (await s.try_("write", f"{sandbox.SANDBOX_DEPS_DIR}/x.py")).startswith("error")


async def test_only_the_platform_reaches_the_instance(
    bwrap_runtime: ProcessRuntime, tmp_path: Path, test_owner: str
) -> None:
    started = await _start(bwrap_runtime, tmp_path, test_owner)
    # Another local user (nobody, as the instances themselves run; or any other uid) gets nowhere.
    for uid in (65534, 1000):
        assert _connect_as(uid, started.address) != "connected"
    assert _connect_as(0, started.address) == "connected"
    async with _session(started) as s:
        # Its socket folder is the platform's once it listens: nothing can be added, nor the socket replaced by
        # a link to a host socket the platform (root) would then connect its clients to.
        assert (await s.try_("write", "/aube/run/x")) == "error EACCES"
        assert (await s.try_("swap", str(tmp_path / "host.sock"))) == "error EACCES"
    assert _connect_as(0, started.address) == "connected"
    assert await probe(started.address, started.instance_id)


@pytest.mark.parametrize("mode", ["none", pytest.param("bwrap", marks=pytest.mark.skipif(not BWRAP, reason="bwrap"))])
async def test_no_platform_secret_in_the_environment(
    mode: str, tmp_path: Path, test_owner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a control plane's own environment holds must never reach a function.
    monkeypatch.setenv("AUBE_NATS_URL", "nats://controlplane:secret@127.0.0.1:4222")
    monkeypatch.setenv("AUBE_NATS_PASSWORD", "secret")
    async with _runtime(tmp_path, mode, test_owner) as rt:
        started = await _start(rt, tmp_path, test_owner)
        async with _session(started) as s:
            keys = json.loads(await s.try_("env"))
    leaked = [k for k in keys if any(word in k.upper() for word in SECRET_WORDS)]
    assert leaked == []


async def _proxy_health(port: int) -> bool:
    """One health request to the proxy's port: True when the proxy itself answered 200."""
    with anyio.move_on_after(3):
        try:
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(b"GET /_aube/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return b" 200 " in await stream.receive()
        except (OSError, anyio.EndOfStream):
            return False
    return False


async def _through_proxy(port: int, name: str) -> ClientConnection:
    """A stream through the proxy, once the proxy's view of the registry has the function (404 until then)."""
    with anyio.fail_after(60):
        while True:
            try:
                return await connect(f"ws://127.0.0.1:{port}/{name}", proxy=None, open_timeout=60)
            except InvalidStatus as e:
                if e.response.status_code != 404:
                    raise
            await anyio.sleep(0.1)


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_through_a_real_proxy_the_function_steals_no_client(  # type: ignore[no-untyped-def]
    platform, nats_server: LocalNatsServer, tmp_path: Path
) -> None:
    """The finding as reported: a function binds the proxy's own port with SO_REUSEPORT to answer its clients."""
    if not BWRAP:
        pytest.skip("bubblewrap is missing or cannot create namespaces here")
    await platform.start_controlplane(AUBE_SANDBOX="bwrap")
    port = free_port()
    platform.start("aube.proxy", AUBE_PROXY_PORT=str(port), AUBE_PROXY_HOST="127.0.0.1", AUBE_PROXY_ID=f"p-{port}")
    with anyio.fail_after(30):
        while not await _proxy_health(port):
            await anyio.sleep(0.1)
    folder = tmp_path / "attacker"
    folder.mkdir()
    (folder / "fn.py").write_text(textwrap.dedent(ATTACKER))
    async with nats_client(platform.nats_url) as (nc, _registry):
        body = UploadRequest(name="attacker", zip=zip_base64(folder))
        assert (await request(nc, names.SUBJECT_UPLOAD, body, UploadReply, 300)).ok
        ws = await _through_proxy(port, "attacker")
        async with ws:
            s = Session(ws)
            await s.try_("reuseport", port)
            # Every client of the proxy still reaches the proxy.
            answered = [await _proxy_health(port) for _ in range(16)]
            assert all(answered), f"{answered.count(False)} of 16 proxy clients did not reach the proxy"
            assert (await s.try_("tcp", nats_server.port)).startswith("error")
            assert (await s.try_("tcp", nats_server.monitor_port)).startswith("error")


SYNC_ECHO = """
def fn(websocket):
    for message in websocket:
        websocket.send(message)
"""


async def test_sync_function_served_on_the_socket_too(
    bwrap_runtime: ProcessRuntime, tmp_path: Path, test_owner: str
) -> None:
    folder = tmp_path / "sync"
    folder.mkdir()
    (folder / "fn.py").write_text(SYNC_ECHO)
    ref = await bwrap_runtime.prepare("sync", 1, folder, Manifest(), test_owner, lambda _: None)
    started = await bwrap_runtime.start(_spec(ref, test_owner))
    assert started.address.startswith("unix:")
    assert await probe(started.address, started.instance_id)
    with anyio.fail_after(20):
        async with instance_ws(started.address) as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"


async def test_a_socket_path_too_long_is_a_clear_failure(tmp_path: Path, test_owner: str) -> None:
    if not BWRAP:
        pytest.skip("bubblewrap is missing or cannot create namespaces here")
    long_dir = tmp_path / ("x" * 100)
    settings = ControlPlaneSettings(data_dir=str(tmp_path / "data"), sandbox="bwrap", socket_dir=str(long_dir))
    rt = ProcessRuntime(settings)
    folder = tmp_path / "sync"
    folder.mkdir()
    (folder / "fn.py").write_text(SYNC_ECHO)
    ref = await rt.prepare("sync", 1, folder, Manifest(), test_owner, lambda _: None)
    with pytest.raises(RuntimeFailure, match="socket_dir is too long"):
        await rt.start(_spec(ref, test_owner))
    assert await rt.instances(test_owner) == []
    assert not long_dir.exists()
    await rt.close()
