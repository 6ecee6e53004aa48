"""Helpers the integration tests share (fixtures live in conftest.py; these are plain functions).

What the benchmark needs too (nats-server, services as processes, deploying, waiting, RSS, sweeping) lives in
harness.py; the names tests have always imported from here (REPO, zip_base64, nats_client, accounts_server,
AccountsServer, wait_http) are re-exported.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus
from harness import REPO as REPO
from harness import AccountsServer as AccountsServer
from harness import accounts_cluster as accounts_cluster
from harness import accounts_server as accounts_server
from harness import nats_client as nats_client
from harness import wait_http as wait_http
from harness import zip_base64 as zip_base64
from nats.aio.client import Client as NATS
from websockets.asyncio.client import ClientConnection, connect, unix_connect
from websockets.exceptions import InvalidStatus

from aube.shared import addresses, credentials, names
from aube.shared.bus import request
from aube.shared.natsserver import free_port
from aube.shared.registry import Registry
from aube.shared.schemas import InstanceRecord, UploadReply, UploadRequest


def consecutive_free_ports(count: int) -> int:
    """A port p with p + 1 ... p + count - 1 free too (aube start gives replica i the operator port base + i)."""
    import socket

    for _ in range(50):
        base = free_port()
        try:
            for offset in range(1, count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        return base
    raise AssertionError(f"no {count} consecutive free ports")


class AubeStart:
    """`aube start` as a real process (its own session, as in a terminal) on the real deploy/nats.conf, on free
    ports, from `workdir` (where it keeps `.data`). Stopped with SIGINT to its group, killed if it hangs."""

    def __init__(self, workdir: Path, env: dict[str, str], proxies: int) -> None:
        self.workdir = workdir
        self.nats_port, self.monitor_port, self.proxy_port = free_port(), free_port(), free_port()
        self.operator_base = consecutive_free_ports(proxies)  # replica i's metrics on operator_base + i
        self.controlplane_operator_port, self.reaper_operator_port = free_port(), free_port()
        self.conf = workdir / "nats.conf"
        text = (REPO / "deploy" / "nats.conf").read_text()
        text = text.replace("listen: 127.0.0.1:4222", f"listen: 127.0.0.1:{self.nats_port}")
        text = text.replace("http: 127.0.0.1:8222", f"http: 127.0.0.1:{self.monitor_port}")
        assert str(self.nats_port) in text and str(self.monitor_port) in text
        self.conf.write_text(text)
        self.env = {
            **env,
            "AUBE_NATS_URL": f"nats://127.0.0.1:{self.nats_port}",
            "AUBE_NATS_MONITOR": f"http://127.0.0.1:{self.monitor_port}",
            "AUBE_PROXY_PORT": str(self.proxy_port),
            "AUBE_OPERATOR_PORT": str(self.operator_base),
            "AUBE_CONTROLPLANE_OPERATOR_PORT": str(self.controlplane_operator_port),
            "AUBE_REAPER_OPERATOR_PORT": str(self.reaper_operator_port),
            "AUBE_LOG_LEVEL": "INFO",
            # `aube start` keeps new deployer credentials in the user's config folder: this run's own, not the home's.
            "XDG_CONFIG_HOME": str(workdir / "config"),
        }
        self.log_path = workdir / "start.log"
        self._log = self.log_path.open("wb")
        argv = [sys.executable, "-m", "aube.cli", "start", "--proxies", str(proxies), "--nats-conf", str(self.conf)]
        self.proc = subprocess.Popen(
            argv, env=self.env, cwd=workdir, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def nats_url(self) -> str:
        return self.env["AUBE_NATS_URL"]

    def login(self, service: str = "controlplane") -> dict[str, str]:
        """nats.connect keyword arguments to log in as `service` (the control plane's login reads the registry)."""
        login = credentials.platform_secrets(self.workdir / ".data").service_login(service)
        return {"user": login.user, "password": login.password}

    def proxy_id(self, replica: int, generation: int = 0) -> str:
        """The proxy id of replica `replica` (1, 2, ...) at its `generation`-th start (cli/platform.py)."""
        return f"proxy-{replica}-{self.proc.pid}" + (f"-r{generation}" if generation else "")

    async def deploy(self, name: str, source: Path, manifest: str) -> None:
        """`aube deploy` of the function folder `source` with `manifest` as its aube.toml, as a deployer does."""
        folder = self.workdir / f"fn-{name}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(source, folder, ignore=shutil.ignore_patterns("__pycache__", "aube.toml"))
        (folder / "aube.toml").write_text(manifest)
        env = {**self.env, "AUBE_CREDENTIALS": str(self.workdir / ".data" / "credentials.env")}
        with anyio.fail_after(300):
            while True:
                done = await anyio.run_process(
                    [sys.executable, "-m", "aube.cli", "deploy", str(folder), name],
                    env=env,
                    cwd=self.workdir,
                    check=False,
                )
                # The proxies answer before the control plane subscribes (it reconciles first): on a loaded machine a
                # deploy right after `aube start` may find nobody answering yet.
                if done.returncode == 0 or b"no service is answering" not in done.stderr:
                    break
                await anyio.sleep(0.5)
        assert done.returncode == 0, done.stderr.decode(errors="replace")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pids(self, label: str) -> list[int]:
        """Every pid `aube start` reported for `label` (e.g. proxy-1), oldest first."""
        return [int(m) for m in re.findall(rf"\[aube\] started {re.escape(label)} \(pid (\d+)\)", self.output())]

    async def started(self, label: str, count: int, timeout: float = 30) -> int:
        """Wait until `aube start` has started `label` `count` times (restarts included); the newest pid. Fails at
        once if the platform stops meanwhile."""
        with anyio.fail_after(timeout):
            while len(pids := self.pids(label)) < count:
                assert self.proc.poll() is None, self.output()[-3000:]
                await anyio.sleep(0.05)
        return pids[-1]

    def interrupt(self, timeout: float = 120) -> int:
        os.killpg(self.proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground group
        return self.proc.wait(timeout)

    def close(self) -> None:
        """Stop a platform the test left running (it failed) as Ctrl-C would, so that its services stop their
        instances; if that hangs, kill the supervisor and its services (each runs in a session of its own, so they
        would outlive it)."""
        if self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.interrupt()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            labels = set(re.findall(r"\[aube\] started (\S+) \(pid", self.output()))
            for pid in [self.pids(label)[-1] for label in labels]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._log.close()


def _tcp_sockets() -> Iterator[tuple[int, int, str, str, str]]:
    """Every IPv4/IPv6 TCP socket: (local port, remote port, state, tx_queue:rx_queue, inode)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)
            yield local, remote, fields[3], fields[4], fields[9]


def _socket_links(pid: int) -> set[str]:
    """The sockets process `pid` holds, as their fd links read ("socket:[inode]"); none if it is gone."""
    links = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                links.add(os.readlink(fd))
    except OSError:
        pass
    return links


def connection_owner(client_port: int, server_port: int, pids: Sequence[int]) -> int | None:
    """Which of `pids` holds the server side of the loopback TCP connection from `client_port` to `server_port`
    (None also while the connection waits in a listener's accept queue: no process holds it yet)."""
    inode = None
    for local, remote, _, _, node in _tcp_sockets():
        if local == server_port and remote == client_port:
            inode = node
    for pid in pids:
        if f"socket:[{inode}]" in _socket_links(pid):
            return pid
    return None


def accept_queue(pid: int, port: int) -> int | None:
    """How many connections wait in the accept queue of the TCP listener that process `pid` holds on `port` (the
    kernel completed their handshake; the process has not accepted them); None if `pid` holds no such listener."""
    links = _socket_links(pid)
    for local, _, state, queues, inode in _tcp_sockets():
        if state == "0A" and local == port and f"socket:[{inode}]" in links:
            return int(queues.split(":")[1], 16)  # a listener's rx_queue is its accept backlog
    return None


def listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds a listening TCP socket on `port`."""
    return accept_queue(pid, port) is not None


async def exchange(conn: ClientConnection, text: str, timeout: float = 10) -> dict[str, Any]:
    """Send `text` on a stream of examples/whoami and return its reply (`instance`: which one answered, `streams`:
    how many it carries); fails on a wrong echo or after `timeout` without one."""
    await conn.send(text)
    with anyio.fail_after(timeout):
        reply: dict[str, Any] = json.loads(await conn.recv())
    assert reply["echo"] == text, reply
    return reply


async def proxy_metrics(proxy: Any) -> dict[str, float]:
    """The proxy's metrics (its operator port), by sample line (name and labels)."""
    port = int(proxy.env["AUBE_OPERATOR_PORT"])
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(b"GET /_aube/metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        chunks = []
        try:
            while True:
                chunks.append(await stream.receive())
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass
    body = b"".join(chunks).decode().partition("\r\n\r\n")[2]
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line and not line.startswith("#")
    }


WHOAMI = REPO / "examples" / "whoami"


@contextlib.asynccontextmanager
async def whoami_stream(port: int, timeout: float = 30) -> AsyncIterator[ClientConnection]:
    """A client stream to the function `who` (examples/whoami) through the proxy on `port`, pings off (the tests
    judge liveness themselves)."""
    async with connect(f"ws://127.0.0.1:{port}/who", proxy=None, open_timeout=timeout, ping_interval=None) as ws:
        yield ws


async def deploy_whoami(nc: NATS, manifest: str) -> UploadReply:
    """Deploy examples/whoami as `who` with `manifest` as its aube.toml."""
    body = UploadRequest(name="who", zip=zip_base64(WHOAMI, {"aube.toml": manifest}))
    return await request(nc, names.SUBJECT_UPLOAD, body, UploadReply, 300)


class Stream(msgspec.Struct, kw_only=True):
    """An open client stream through a proxy: the replica (pid) holding it and the instance (id) serving it."""

    conn: ClientConnection
    owner: int | None
    instance: str


async def open_stream(url: str, port: int, pids: Sequence[int], open_timeout: float = 30) -> Stream:
    """A whoami stream through the proxies on `port` (replicas `pids`); its first exchange shows it carries one
    stream only. A 404 is tried again for a few seconds: a proxy's view may trail an upload's reply by a moment."""
    with anyio.fail_after(open_timeout + 10):
        while True:
            try:
                conn = await connect(url, proxy=None, open_timeout=open_timeout)
                break
            except InvalidStatus as e:
                if e.response.status_code != 404:
                    raise
                await anyio.sleep(0.1)
    reply = await exchange(conn, "hello")
    assert reply["streams"] == 1, reply
    return Stream(conn=conn, owner=connection_owner(conn.local_address[1], port, pids), instance=reply["instance"])


async def streams_on_each(url: str, port: int, pids: Sequence[int], each: int, limit: int = 30) -> list[Stream]:
    """Open streams until every replica in `pids` carries `each` of them (SO_REUSEPORT spreads connections over
    the replicas by a hash of their addresses, so how many it takes varies)."""
    streams: list[Stream] = []
    with anyio.fail_after(120):
        while any(sum(s.owner == pid for s in streams) < each for pid in pids):
            assert len(streams) < limit, f"{limit} connections did not reach every replica {each} times"
            streams.append(await open_stream(url, port, pids))
    return streams


class Talk:
    """Exchanges on every stream, round after round, until stopped (`run` in a task group): a stream cut or
    answered by another instance fails the test."""

    def __init__(self, streams: Sequence[Stream], every: float = 0.2) -> None:
        self.streams = list(streams)
        self.every = every
        self.rounds = 0
        self._stop = anyio.Event()
        self._done = anyio.Event()

    async def run(self) -> None:
        try:
            while not self._stop.is_set():
                for stream in self.streams:
                    reply = await exchange(stream.conn, f"round-{self.rounds}")
                    assert (reply["instance"], reply["streams"]) == (stream.instance, 1), reply
                self.rounds += 1
                with anyio.move_on_after(self.every):
                    await self._stop.wait()
        finally:
            self._done.set()

    async def stop(self) -> int:
        """Stop after the round under way (so no reply is left unread on a stream); how many rounds there were."""
        self._stop.set()
        await self._done.wait()
        return self.rounds


class RegistryTrail:
    """Every change of the instance registry, in order, as a watch beside the platform saw it: a state an entry
    held for a moment only, which polling could miss, is in here."""

    def __init__(self) -> None:
        self.changes: list[tuple[float, str, int, InstanceRecord | None]] = []  # (monotonic, key, revision, record)

    async def follow(self, registry: Registry, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Record changes until cancelled; started once the entries that existed before are in."""
        started = False
        async for change in registry.watch_instances():
            if change is None:
                if not started:
                    started = True
                    task_status.started()
            else:
                self.changes.append((time.monotonic(), change.key, change.revision, change.record))

    async def quiet(self, *, for_seconds: float = 0.5, timeout: float = 15.0) -> None:
        """Wait until no change has come for `for_seconds`: the writes that follow an event (a handed-off stream's
        flag on its claim, the keeper's scale-out) are done, so a fault injected next is not mistaken for them."""
        with anyio.fail_after(timeout):
            while True:
                seen = len(self.changes)
                await anyio.sleep(for_seconds)
                if len(self.changes) == seen:
                    return

    def timeline(self, instance_id: str) -> list[tuple[float, str]]:
        """When (monotonic) instance `instance_id` reached each of its states: a claim is "busy:<proxy id>", the
        deletion of its entry "gone"."""
        at_key: dict[str, tuple[int, str]] = {}  # key -> (revision, instance id) last seen there
        states: list[tuple[float, str]] = []
        for at, key, revision, record in self.changes:
            before = at_key.get(key)
            if before is not None and revision <= before[0]:
                continue  # a repeat (the watch may deliver one again)
            if record is None:
                at_key.pop(key, None)
                if before is not None and before[1] == instance_id:
                    states.append((at, "gone"))
                continue
            at_key[key] = (revision, record.instance_id)
            if record.instance_id == instance_id:
                states.append((at, f"busy:{record.claimed_by}" if record.state == "busy" else record.state))
        return states

    def history(self, instance_id: str, since: float = 0.0) -> list[str]:
        """The states instance `instance_id` went through from `since` (monotonic) on, as in `timeline`."""
        return [state for at, state in self.timeline(instance_id) if at >= since]


async def running_instance_ids(owner: str, runtime: str, data_dir: str) -> set[str]:
    """The instances of control plane `owner` that run now, by id: live containers (Docker) or processes."""
    if runtime == "docker":
        import docker

        def containers() -> set[str]:
            client = docker.from_env(timeout=30)
            try:
                found = client.containers.list(filters={"label": f"{names.LABEL_OWNER}={owner}", "status": "running"})
                return {c.labels.get(names.LABEL_INSTANCE, "") for c in found}
            finally:
                client.close()

        return await anyio.to_thread.run_sync(containers)
    from aube.controlplane.runtimes.process import ProcessRuntime
    from aube.shared.settings import ControlPlaneSettings

    runtime_ = ProcessRuntime(ControlPlaneSettings(owner=owner, data_dir=data_dir))
    try:
        return {r.instance_id for r in await runtime_.instances(owner) if r.alive}
    finally:
        await runtime_.close()


async def wait_runtime_agrees(
    registry: Registry, owner: str, runtime: str, data_dir: str, timeout: float = 30
) -> set[str]:
    """Until the instances running and the registry's entries of `owner` are the same ones, none starting or
    stopping (invariant 2); their ids."""
    with anyio.fail_after(timeout):
        while True:
            running = await running_instance_ids(owner, runtime, data_dir)
            entries = [e.record for e in await registry.instances() if e.record.owner == owner]
            settled = all(r.state in ("free", "busy") for r in entries)
            if settled and running == {r.instance_id for r in entries}:
                return running
            await anyio.sleep(0.2)


def instance_ws(address: str, path: str = "/fn", *, secret: str = "", **kwargs: Any) -> connect:
    """A websockets client straight to an instance's registry address: `host:port`, or `unix:<path>` (a
    sandboxed process instance), presenting the instance's credential `secret` as the proxy does."""
    if secret:
        kwargs["additional_headers"] = {**kwargs.get("additional_headers", {}), names.HEADER_INSTANCE_SECRET: secret}
    target = addresses.parse(address)
    if isinstance(target, addresses.UnixAddress):
        return unix_connect(target.path, f"ws://instance{path}", **kwargs)
    return connect(f"ws://{target.host}:{target.port}{path}", proxy=None, **kwargs)


def credential(record: InstanceRecord) -> dict[str, str]:
    """The header a test presents when it dials an instance straight, as a proxy would (docs/security.md)."""
    return {names.HEADER_INSTANCE_SECRET: record.secret} if record.secret else {}
