"""Helpers the integration tests share (fixtures live in conftest.py; these are plain functions)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import nats
from nats.aio.client import Client as NATS
from websockets.asyncio.client import connect, unix_connect

from aube.shared import addresses, credentials, names
from aube.shared.natscluster import LocalNatsCluster
from aube.shared.natsserver import LocalNatsServer, free_port
from aube.shared.registry import Registry
from aube.shared.schemas import InstanceRecord

REPO = Path(__file__).resolve().parent.parent


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


@asynccontextmanager
async def nats_client(url: str) -> AsyncIterator[tuple[NATS, Registry]]:
    nc = await nats.connect(url)
    try:
        yield nc, await Registry.open(nc.jetstream())
    finally:
        await nc.close()


class AccountsServer:
    """A nats-server on the real deploy/nats.conf (accounts: the platform's, `deployer`'s and any other tenant's),
    or a cluster of them (deploy/cluster/node.conf; `url` then lists every node)."""

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

    def all_passwords(self) -> list[str]:
        return [*self.secrets.passwords.values(), self.login("deployer").password]


@contextmanager
def accounts_server(data: Path, tenants: Sequence[str] = ()) -> Iterator[AccountsServer]:
    secrets = credentials.platform_secrets(data)
    credentials.ensure_default_tenant(data, data / "credentials.env")
    for tenant in tenants:
        credentials.add_tenant(data, tenant)
    hashes = json.loads((data / credentials.TENANT_LIST_FILE).read_text())
    with LocalNatsServer(config=REPO / "deploy" / "nats.conf", env=secrets.environment(), tenant_hashes=hashes) as s:
        yield AccountsServer(s, secrets, data)


@contextmanager
def accounts_cluster(data: Path, tenants: Sequence[str] = (), size: int = 3) -> Iterator[AccountsServer]:
    """`accounts_server` as a cluster of `size` local nodes (natscluster.LocalNatsCluster)."""
    secrets = credentials.platform_secrets(data)
    credentials.ensure_default_tenant(data, data / "credentials.env")
    for tenant in tenants:
        credentials.add_tenant(data, tenant)
    hashes = json.loads((data / credentials.TENANT_LIST_FILE).read_text())
    with LocalNatsCluster(
        config=REPO / "deploy" / "nats.conf",
        node_template=REPO / "deploy" / "cluster" / "node.conf",
        size=size,
        env=secrets.environment(),
        tenant_hashes=hashes,
    ) as cluster:
        yield AccountsServer(cluster, secrets, data)


async def wait_http(port: int, timeout: float = 30) -> None:
    """Until a proxy on 127.0.0.1:`port` answers its health check."""
    with anyio.fail_after(timeout):
        while True:
            try:
                async with await anyio.connect_tcp("127.0.0.1", port) as s:
                    await s.send(b"GET /_aube/health HTTP/1.1\r\nHost: x\r\n\r\n")
                    if b" 200 " in await s.receive():
                        return
            except OSError:
                pass
            await anyio.sleep(0.1)


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
            "AUBE_LOG_LEVEL": "INFO",
        }
        self.log_path = workdir / "start.log"
        self._log = self.log_path.open("wb")
        argv = [sys.executable, "-m", "aube.cli", "start", "--proxies", str(proxies), "--nats-conf", str(self.conf)]
        self.proc = subprocess.Popen(
            argv, env=self.env, cwd=workdir, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pids(self, label: str) -> list[int]:
        """Every pid `aube start` reported for `label` (e.g. proxy-1), oldest first."""
        return [int(m) for m in re.findall(rf"\[aube\] started {re.escape(label)} \(pid (\d+)\)", self.output())]

    def interrupt(self, timeout: float = 120) -> int:
        os.killpg(self.proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground group
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def connection_owner(client_port: int, server_port: int, pids: Sequence[int]) -> int | None:
    """Which of `pids` holds the server side of the loopback TCP connection from `client_port` to `server_port`."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)
            if local == server_port and remote == client_port:
                inode = fields[9]
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
        except OSError:
            continue
    return None


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
