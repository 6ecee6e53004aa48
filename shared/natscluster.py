"""A local NATS cluster for tests and development: `size` nats-server processes on loopback, each configured as a
real cluster node (deploy/cluster/node.conf over deploy/nats.conf: the platform's accounts, users and permissions,
authenticated routes, `sync_interval: always`), each with its own store folder, on free ports.

Nodes are killed and restarted individually (SIGKILL: a crash, nothing flushed or handed over), keeping their
ports and store, as a crashed node of a real cluster comes back.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from aube.shared import credentials
from aube.shared.errors import RuntimeFailure
from aube.shared.natsserver import ClusterNode, find_nats_server, free_port, write_cluster_node_config


class _Node:
    def __init__(self, name: str, folder: Path) -> None:
        self.name = name
        self.folder = folder
        self.spec = ClusterNode(name=name, client="", monitor="", cluster_listen="", route="")
        self.process: subprocess.Popen[bytes] | None = None

    def plan(self) -> None:
        client, monitor, route = (f"127.0.0.1:{free_port()}" for _ in range(3))
        self.spec = ClusterNode(name=self.name, client=client, monitor=monitor, cluster_listen=route, route=route)

    @property
    def port(self) -> int:
        return int(self.spec.client.rsplit(":", 1)[1])

    @property
    def url(self) -> str:
        return f"nats://{self.spec.client}"

    def health(self, *, js_enabled_only: bool = False) -> bool:
        """Whether the node answers healthy: with `js_enabled_only`, just up; else also in contact with a JetStream
        meta leader and current with it (a node that is not refuses to serve JetStream requests)."""
        query = "?js-enabled-only=true" if js_enabled_only else ""
        try:
            with urllib.request.urlopen(f"http://{self.spec.monitor}/healthz{query}", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:  # refused, or an HTTP error status (503 until current)
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class LocalNatsCluster:
    """`size` cluster nodes named aube-nats-1..N; `url` lists them all (AUBE_NATS_URL of a service)."""

    def __init__(
        self,
        *,
        config: Path,
        node_template: Path,
        size: int = 3,
        env: dict[str, str] | None = None,
        tenant_hashes: dict[str, str] | None = None,
        host_hashes: dict[str, str] | None = None,
    ) -> None:
        """`config` is deploy/nats.conf (its `$AUBE_NATS_*_PASSWORD` variables come from `env`), `node_template`
        deploy/cluster/node.conf."""
        self.config = config.resolve()
        self.node_template = node_template.resolve()
        self.env = env or {}
        self.tenant_hashes = dict(tenant_hashes or {})
        self.host_hashes = dict(host_hashes or {})
        self.route_password = credentials.new_password()
        self.root = Path(tempfile.mkdtemp(prefix="aube-nats-cluster-"))
        self.nodes = [_Node(f"aube-nats-{i + 1}", self.root / f"aube-nats-{i + 1}") for i in range(size)]

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def index_of(self, name: str) -> int:
        """The index of the node named `name` (as JetStream names a stream's leader and replicas)."""
        return [node.name for node in self.nodes].index(name)

    def start(self, timeout: float = 30.0, attempts: int = 3) -> LocalNatsCluster:
        """Start every node and wait until each is current with a meta leader. A port taken between choosing it and
        a node's bind (other processes pick free ports too) makes that node exit: then all again, on new ports."""
        for _ in range(attempts):
            for node in self.nodes:
                shutil.rmtree(node.folder, ignore_errors=True)  # nothing of a failed attempt's cluster state
                node.plan()
            for node in self.nodes:
                self._launch(node)
            if self._wait(self.nodes, timeout):
                return self
            self._kill_all()
        tails = {n.name: self._log(n)[-1500:] for n in self.nodes}
        self.stop()
        raise RuntimeFailure(f"the NATS cluster did not start ({attempts} attempts): {tails}")

    def kill(self, index: int) -> None:
        """SIGKILL node `index` (0-based): a crash. Its ports and store are kept for `restart`."""
        node = self.nodes[index]
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(signal.SIGKILL)
            node.process.wait()
        node.process = None

    def pause(self, index: int) -> None:
        """SIGSTOP node `index`: a hung node, whose kernel still holds its connections open (no refusal, no EOF)."""
        node = self.nodes[index]
        assert node.process is not None
        node.process.send_signal(signal.SIGSTOP)

    def resume(self, index: int) -> None:
        node = self.nodes[index]
        assert node.process is not None
        node.process.send_signal(signal.SIGCONT)

    def restart(self, index: int, timeout: float = 30.0) -> None:
        """Start node `index` again on its ports and store, and wait until it is current."""
        node = self.nodes[index]
        if node.alive():
            return
        self._launch(node)
        if not self._wait([node], timeout):
            raise RuntimeFailure(f"{node.name} did not come back: {self._log(node)[-1500:]}")

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive():
                assert node.process is not None
                node.process.send_signal(signal.SIGCONT)  # a paused node would not see the SIGTERM
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(10)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait()
                node.process = None
        shutil.rmtree(self.root, ignore_errors=True)

    def _launch(self, node: _Node) -> None:
        specs = [n.spec for n in self.nodes]
        conf = write_cluster_node_config(
            self.config,
            self.node_template,
            node.folder / "conf",
            self.tenant_hashes,
            node.spec,
            specs,
            store_dir=str(node.folder / "js"),
            route_password=self.route_password,
            host_hashes=self.host_hashes,
        )
        # deploy/nats.conf's relative pid_file lands in the node's folder, its working directory.
        (node.folder / ".data" / "nats").mkdir(parents=True, exist_ok=True)
        with (node.folder / "nats-server.log").open("ab") as log:
            node.process = subprocess.Popen(
                [find_nats_server(), "-c", str(conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=node.folder,
                env={**os.environ, **self.env},
            )

    def _wait(self, nodes: list[_Node], timeout: float) -> bool:
        """True once every node in `nodes` is healthy; False if one exits first or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not all(n.alive() for n in nodes):
                return False
            if all(n.health() for n in nodes):
                return True
            time.sleep(0.1)
        return False

    def _kill_all(self) -> None:
        for index in range(len(self.nodes)):
            self.kill(index)

    def _log(self, node: _Node) -> str:
        path = node.folder / "nats-server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> LocalNatsCluster:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
