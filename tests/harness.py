"""The one harness of the tests and the benchmark: Aube's platform as real processes on loopback.

It owns what both need and neither should write twice: a nats-server (plain, or on the platform's own
deploy/nats.conf with its accounts), the services as `python -m aube.<service>` child processes with their AUBE_*
environment and a log file each, a function folder packed and deployed, the waits for readiness (the control plane
answers a list request, a proxy its health check, a function has free instances), a process's RSS, and the sweep of
what a run may leave behind (process-runtime instances, labelled containers and images).

Plain functions and classes, no pytest: tests/conftest.py builds its fixtures on them, tests/support.py re-exports
the helpers tests import from there, and bench/run.py imports this module (it puts tests/ on its path).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import nats
from nats.aio.client import Client as NATS

from aube.shared import credentials, names
from aube.shared.bus import request
from aube.shared.errors import ServiceUnavailable
from aube.shared.natscluster import LocalNatsCluster
from aube.shared.natsconn import server_list
from aube.shared.natsserver import LocalNatsServer, free_port
from aube.shared.registry import InstanceEntry, Registry
from aube.shared.schemas import ListReply, ListRequest, UploadReply, UploadRequest

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------------------------
# Function bundles and deploying them


def zip_base64(folder: Path, extra: Mapping[str, str] | None = None) -> str:
    """The folder as AubeFaaS's upload script sent it: a base64 zip with the files at the archive root.
    `extra` files are added, replacing any of the same name."""
    extra = extra or {}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.name not in extra:
                z.write(path, str(path.relative_to(folder)))
        for name, text in extra.items():
            z.writestr(name, text)
    return base64.b64encode(buf.getvalue()).decode()


def zip_files(files: Mapping[str, str]) -> str:
    """A base64 zip of the given files (name -> text), for a function written inline."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in files.items():
            z.writestr(name, text)
    return base64.b64encode(buf.getvalue()).decode()


async def deploy(
    nc: NATS, name: str, folder: Path, extra: Mapping[str, str] | None = None, timeout: float = 300.0
) -> UploadReply:
    """Upload a function folder (plus `extra` files) over NATS and wait for its reply: built, healthy, free."""
    body = UploadRequest(name=name, zip=zip_base64(folder, extra))
    return await request(nc, names.SUBJECT_UPLOAD, body, UploadReply, timeout)


@asynccontextmanager
async def nats_client(url: str, **options: Any) -> AsyncIterator[tuple[NATS, Registry]]:
    """A connection (`options`: nats.connect's, e.g. a login) and the registry read through it, closed after."""
    nc = await nats.connect(servers=server_list(url), **options)  # one server, or a cluster's list
    try:
        yield nc, await Registry.open(nc.jetstream())
    finally:
        await nc.close()


async def wait_free(registry: Registry, name: str, count: int, timeout: float = 120.0) -> list[InstanceEntry]:
    """Until `name` has at least `count` free instances; those, lowest slot first."""
    with anyio.fail_after(timeout):
        while True:
            free = sorted(
                (e for e in await registry.instances(name) if e.record.state == "free" and e.record.address),
                key=lambda e: e.record.slot,
            )
            if len(free) >= count:
                return free
            await anyio.sleep(0.05)


# ---------------------------------------------------------------------------------------------------------------
# nats-server on the platform's configuration


class AccountsServer:
    """A nats-server on the real deploy/nats.conf (accounts: the platform's, `deployer`'s and any other tenant's)."""

    def __init__(
        self, server: LocalNatsServer | LocalNatsCluster, secrets: credentials.PlatformSecrets, data: Path
    ) -> None:
        self.server = server
        self.secrets = secrets
        self.data = data

    @property
    def url(self) -> str:
        return self.server.url

    def login(self, tenant: str) -> credentials.Login:
        path = self.data / ("credentials.env" if tenant == "deployer" else f"tenants/{tenant}.env")
        login = credentials.load_login(path)
        assert login is not None
        return login

    def options(self, tenant: str) -> dict[str, str]:
        """nats.connect keyword arguments for `tenant`."""
        login = self.login(tenant)
        return {"user": login.user, "password": login.password}

    def service_env(self, service: str) -> dict[str, str]:
        """The AUBE_* variables a service process needs to log in as itself."""
        login = self.secrets.service_login(service)
        env = {"AUBE_NATS_USER": login.user, "AUBE_NATS_PASSWORD": login.password}
        if service == "controlplane":
            env["AUBE_NATS_FETCH_PASSWORD"] = self.secrets.fetch_password
        return env

    def agent_env(self, host_id: str) -> dict[str, str]:
        """The AUBE_* variables of `host_id`'s agent: its host id and its own login (its file, as an operator
        would hand it to the host). The host must be among `accounts_server`'s `hosts`."""
        login, _ = credentials.ensure_host(self.data, host_id)
        assert host_id in credentials.host_hashes(self.data), f"{host_id} is not one of the server's hosts"
        return {"AUBE_HOST_ID": host_id, "AUBE_NATS_USER": login.user, "AUBE_NATS_PASSWORD": login.password}

    def all_passwords(self) -> list[str]:
        return [*self.secrets.passwords.values(), self.login("deployer").password]


def _identities(data: Path, tenants: Sequence[str], hosts: Sequence[str]) -> credentials.PlatformSecrets:
    """The platform's secrets, its default tenant, `tenants` and `hosts` (agent logins), made in `data`."""
    secrets = credentials.platform_secrets(data)
    credentials.ensure_default_tenant(data, data / "credentials.env")
    for tenant in tenants:
        credentials.add_tenant(data, tenant)
    for host_id in hosts:
        credentials.ensure_host(data, host_id)
    return secrets


@contextmanager
def accounts_server(data: Path, tenants: Sequence[str] = (), hosts: Sequence[str] = ()) -> Iterator[AccountsServer]:
    """The platform's nats-server as `make start` runs it, on free ports, its secrets, tenants and host agents'
    logins made in `data`."""
    secrets = _identities(data, tenants, hosts)
    hashes = json.loads((data / credentials.TENANT_LIST_FILE).read_text())
    with LocalNatsServer(
        config=REPO / "deploy" / "nats.conf",
        env=secrets.environment(),
        tenant_hashes=hashes,
        host_hashes=credentials.host_hashes(data),
    ) as s:
        yield AccountsServer(s, secrets, data)


@contextmanager
def accounts_cluster(
    data: Path, tenants: Sequence[str] = (), size: int = 3, hosts: Sequence[str] = ()
) -> Iterator[AccountsServer]:
    """`accounts_server` as a cluster of `size` local nodes (natscluster.LocalNatsCluster)."""
    secrets = _identities(data, tenants, hosts)
    hashes = json.loads((data / credentials.TENANT_LIST_FILE).read_text())
    with LocalNatsCluster(
        config=REPO / "deploy" / "nats.conf",
        node_template=REPO / "deploy" / "cluster" / "node.conf",
        size=size,
        env=secrets.environment(),
        tenant_hashes=hashes,
        host_hashes=credentials.host_hashes(data),
    ) as cluster:
        yield AccountsServer(cluster, secrets, data)


# ---------------------------------------------------------------------------------------------------------------
# Services as processes


def proc_status_kib(pid: int, field: str) -> int:
    """A /proc/<pid>/status field in KiB (VmRSS: resident now; VmHWM: the peak since the process started)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as e:
        raise AssertionError(f"process {pid} is gone (it exited)") from e
    for line in status.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


class ServiceProcess:
    """One Aube service (`python -m aube.<module>`) as a child process with its own AUBE_* environment."""

    def __init__(self, module: str, env: dict[str, str], log_path: Path) -> None:
        self.module = module
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module], env=self.env, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_kib(self) -> int:
        """Resident memory now, in KiB."""
        return proc_status_kib(self.pid, "VmRSS")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 90) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit code. Idempotent."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def http_status(host: str, port: int, path: str) -> int | None:
    """Status of a GET, or None while nothing answers."""
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = s.recv(256)
        return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else None
    except (OSError, ValueError, IndexError):
        return None


async def wait_http(port: int, timeout: float = 30, host: str = "127.0.0.1") -> None:
    """Until a proxy on `host`:`port` answers its health check."""
    with anyio.fail_after(timeout):
        while True:
            try:
                async with await anyio.connect_tcp(host, port) as s:
                    await s.send(f"GET {names.PATH_HEALTH} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                    if b" 200 " in await s.receive():
                        return
            except OSError:
                pass
            await anyio.sleep(0.1)


# Each service's operator (metrics) port variable: tests give every service a free port of its own.
OPERATOR_PORT_VARIABLES = {
    "aube.proxy": "AUBE_OPERATOR_PORT",
    "aube.controlplane": "AUBE_CONTROLPLANE_OPERATOR_PORT",
    "aube.reaper": "AUBE_REAPER_OPERATOR_PORT",
}


class Platform:
    """Services of one platform started as processes against one nats-server; `stop_all` stops and sweeps them.

    Each service's environment: the caller's without any AUBE_* variable (a developer's settings must not leak in),
    then this platform's (NATS, owner, runtime, data folder, instances stopped with the control plane), then
    `env_defaults` (the tests' and the benchmark's own choices), then what the start asks for.
    """

    def __init__(
        self,
        nats_url: str,
        owner: str,
        runtime: str,
        work: Path,
        *,
        env_defaults: Mapping[str, str] | None = None,
        network: str = "",
        bridge: str = "",
    ) -> None:
        self.nats_url = nats_url
        self.owner = owner
        self.runtime = runtime
        self.tmp = work  # logs and the data folder
        self.data_dir = str(work / "data")
        self.env_defaults = dict(env_defaults or {})
        # The Docker network and bridge instances join ("": the platform's default).
        self.network, self.bridge = network, bridge
        self.services: list[ServiceProcess] = []
        self.leaked = 0
        # A login for the harness's own requests (wait_ready) on a server with accounts: the control plane's.
        self.login: dict[str, str] = {}

    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUBE_") or k == "AUBE_REQUIRE_DOCKER"}
        env.update(
            AUBE_NATS_URL=self.nats_url,
            AUBE_OWNER=self.owner,
            AUBE_RUNTIME=self.runtime,
            AUBE_DATA_DIR=self.data_dir,
            # A stopped control plane stops its instances: whatever runs after `stop_all` is a leak.
            AUBE_STOP_INSTANCES_ON_EXIT="true",
        )
        if self.network:
            env.update(AUBE_INSTANCE_NETWORK=self.network, AUBE_INSTANCE_BRIDGE=self.bridge)
        env.update(self.env_defaults)
        env.update(overrides)
        return env

    def start(self, module: str, **overrides: str) -> ServiceProcess:
        """Start `python -m <module>`, logging to <work>/<service>-<n>.log; returns at once (no readiness wait)."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        name = module.rsplit(".", 1)[-1]
        operator_port = OPERATOR_PORT_VARIABLES.get(module)
        if operator_port is not None and operator_port not in overrides:
            # Not the default (9091-9093): a platform running on this machine (make start, the rig) holds it.
            overrides = {**overrides, operator_port: str(free_port())}
        service = ServiceProcess(module, self.env(**overrides), self.tmp / f"{name}-{len(self.services)}.log").start()
        self.services.append(service)
        return service

    async def start_controlplane(self, **overrides: str) -> ServiceProcess:
        if "AUBE_NATS_USER" in overrides:  # a server with accounts: wait_ready asks as the control plane
            self.login = {"user": overrides["AUBE_NATS_USER"], "password": overrides["AUBE_NATS_PASSWORD"]}
        service = self.start("aube.controlplane", **overrides)
        await self.wait_ready(service)
        return service

    async def start_proxy(self, **overrides: str) -> tuple[int, ServiceProcess]:
        """A proxy replica on a free loopback port (and a free operator port), once it answers its health check."""
        port = free_port()
        env = {
            "AUBE_PROXY_PORT": str(port),
            "AUBE_PROXY_HOST": "127.0.0.1",
            "AUBE_PROXY_ID": f"proxy-{port}",
            # Metrics are on the operator port only; a free one, so a running platform's 9093 is no obstacle.
            "AUBE_OPERATOR_PORT": str(free_port()),
        }
        service = self.start("aube.proxy", **{**env, **overrides})
        port = int(service.env["AUBE_PROXY_PORT"])
        await wait_http(port, timeout=60)
        return port, service

    async def wait_ready(self, service: ServiceProcess, timeout: float = 120) -> None:
        """Wait until the control plane answers a list request (its subscriptions are live)."""
        async with nats_client(self.nats_url, **self.login) as (nc, _):
            deadline = time.monotonic() + timeout
            while True:
                assert service.proc is not None
                if service.proc.poll() is not None:
                    raise AssertionError(f"{service.module} exited:\n{service.log_text()[-3000:]}")
                try:
                    await request(nc, names.SUBJECT_LIST, ListRequest(), ListReply, 1.0)
                    return
                except ServiceUnavailable:
                    if time.monotonic() > deadline:
                        raise
                    await anyio.sleep(0.1)

    def rss_kib(self) -> dict[str, int]:
        """Resident memory of every running service, by its log's name (e.g. proxy-1), in KiB."""
        return {s.log_path.stem: s.rss_kib() for s in self.services if s.running()}

    def stop_all(self, *, show_logs: bool = True) -> int:
        """Stop the services; return how many instances outlived them so far (each one a leak). Idempotent.
        `show_logs` prints each service's last lines (pytest shows them for a failed test only)."""
        for service in reversed(self.services):
            service.stop()
        if show_logs:
            for service in self.services:
                print(f"----- {service.log_path.name} (last lines) -----\n{service.log_text()[-6000:]}")
        if self.runtime == "process":
            self.leaked += stop_process_instances(self.owner, self.data_dir)
        return self.leaked


# ---------------------------------------------------------------------------------------------------------------
# Sweeping up


def stop_process_instances(owner: str, data_dir: str) -> int:
    """Stop (and count) the process-runtime instances of `owner` still running."""
    from aube.controlplane.runtimes.process import ProcessRuntime
    from aube.shared.settings import ControlPlaneSettings

    async def sweep() -> int:
        runtime = ProcessRuntime(ControlPlaneSettings(owner=owner, data_dir=data_dir))
        leftovers = await runtime.instances(owner)
        for instance in leftovers:
            await runtime.stop(instance.handle)
        await runtime.close()
        return len(leftovers)

    # Called from inside an event loop too (a test stopping its platform early): then from a thread of its own.
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return anyio.run(sweep)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(anyio.run, sweep).result()


def remove_labelled(client: Any, owner: str, *, images: bool = True) -> int:
    """Remove every container (and image) labelled with `owner` from the Docker engine; the number of containers."""
    label = f"{names.LABEL_OWNER}={owner}"
    containers = client.containers.list(all=True, filters={"label": label})
    for c in containers:
        c.remove(force=True)
    if images:
        for image in client.images.list(filters={"label": label}):
            client.images.remove(image.id, force=True)
    return len(containers)
