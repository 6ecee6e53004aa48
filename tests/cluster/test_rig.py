"""Smoke test of the test rig (`scripts/cluster.sh`, issue 10): the three NATS containers form one cluster with
JetStream and the platform's real accounts, each host's proxy answers on its published port, each host's inner
Docker engine runs containers, and an instance port published on one host is reached from another.

Marked `cluster`: `make test-cluster` runs it, `make test` does not. It brings the rig up (`up` is idempotent:
a rig already up is reused and left up; one it started is taken down after, unless AUBE_CLUSTER_KEEP=1).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import anyio
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue
from rig import layout
from rig import state as rig_state

from aube.shared import credentials, natsconn

pytestmark = [pytest.mark.cluster, pytest.mark.anyio, pytest.mark.timeout(1800)]

CHECKOUT = Path(__file__).resolve().parents[2]


def _monitor(node: layout.NatsNode, path: str) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.monitor_port}{path}", timeout=5) as r:
        found: dict[str, object] = json.loads(r.read())
        return found


def _docker(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *argv], capture_output=True, text=True, timeout=timeout, check=False)


def test_nats_nodes_form_one_cluster(cluster: Path) -> None:
    names = {node.name for node in layout.NATS_NODES}
    leaders = set()
    for node in layout.NATS_NODES:
        routes = _monitor(node, "/routez")["routes"]
        assert isinstance(routes, list)
        assert {r["remote_name"] for r in routes} == names - {node.name}, f"{node.name}'s routes: {routes}"
        meta = _monitor(node, "/jsz")["meta_cluster"]
        assert isinstance(meta, dict)
        assert meta["cluster_size"] == 3
        leaders.add(meta["leader"])
    assert len(leaders) == 1 and leaders <= names, f"the nodes name different JetStream leaders: {leaders}"


async def _connect(url: str, login: credentials.Login) -> NATS:
    """Bounded: a node that is down fails the test instead of being retried for ever."""
    return await natsconn.connect(
        url, user=login.user, password=login.password, name="rig-smoke", connect_timeout=5, max_reconnect_attempts=2
    )


async def _first_put(kv: KeyValue) -> int:
    """The first write to a bucket just created. Measured on a fresh rig: the stream's subjects may not be known
    yet on the node the client talks to ("no response from stream"), for a moment after the create returned."""
    started = time.monotonic()
    for attempt in range(1, 51):
        try:
            revision = await kv.put("key", b"first")
        except nats.js.errors.NoStreamResponseError:
            await anyio.sleep(0.1)
            continue
        print(f"first put to a new R3 bucket acknowledged after {time.monotonic() - started:.2f}s ({attempt} tries)")
        return revision
    raise AssertionError(f"no write to a new R3 bucket acknowledged in {time.monotonic() - started:.1f}s")


async def test_a_three_replica_write_is_acknowledged_and_read_on_every_node(cluster: Path) -> None:
    """With the platform's own control-plane login (the NATS configuration is the platform's, accounts and all)."""
    login = credentials.platform_secrets(cluster).service_login("controlplane")
    bucket = f"rig-smoke-{uuid.uuid4().hex[:8]}"
    with anyio.fail_after(60):
        nc = await _connect(layout.client_url(), login)
        try:
            js = nc.jetstream(timeout=10)
            kv = await js.create_key_value(bucket=bucket, replicas=3)
            revision = await _first_put(kv)
            started = time.monotonic()
            assert await kv.put("key", b"written") == revision + 1
            print(f"R3 put acknowledged in {1000 * (time.monotonic() - started):.1f} ms")
            info = await js.stream_info(f"KV_{bucket}")
            assert info.config.num_replicas == 3
            assert info.cluster is not None
            assert len(info.cluster.replicas or []) == 2, info.cluster
            for node in layout.NATS_NODES:  # each node on its own: every one serves the replicated bucket
                one = await _connect(node.url, login)
                try:
                    entry = await (await one.jetstream(timeout=10).key_value(bucket)).get("key")
                    assert entry.value == b"written", node.name
                finally:
                    await one.close()
        finally:
            with anyio.move_on_after(15, shield=True):
                try:
                    await nc.jetstream(timeout=10).delete_key_value(bucket)
                finally:
                    await nc.close()


def _aube_ls(credentials_file: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, **env, "AUBE_CREDENTIALS": str(credentials_file), "AUBE_CLI_TIMEOUT": "5"}
    argv = [str(CHECKOUT / ".venv" / "bin" / "aube"), "ls"]
    return subprocess.run(argv, capture_output=True, text=True, env=environ, timeout=60, check=False)


def test_the_aube_cli_logs_in_with_the_deployer_credentials_file(cluster: Path, tmp_path: Path) -> None:
    """`aube` against the rig, as a deployer would run it: AUBE_CREDENTIALS for the login, the file's AUBE_NATS_URL
    (sourced) for the servers. Without a control plane the request has no answer, but the login is accepted."""
    path = cluster / rig_state.CREDENTIALS_FILE
    values = dict(line.split("=", 1) for line in path.read_text().splitlines())
    assert values["AUBE_NATS_URL"] == "nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224"
    for url in natsconn.server_list(values["AUBE_NATS_URL"]):
        listed = _aube_ls(path, {"AUBE_NATS_URL": url})
        assert listed.returncode == 0 or "no service is answering" in listed.stderr, (url, listed.stderr)
    wrong = tmp_path / "wrong.env"
    credentials.write_login(wrong, credentials.Login(user=credentials.DEPLOYER_USER, password="Wrong"))
    refused = _aube_ls(wrong, {"AUBE_NATS_URL": values["AUBE_NATS_URL"]})
    assert refused.returncode == 1 and "Authorization Violation" in refused.stderr, refused.stderr


def test_each_proxy_answers_health_on_its_published_port(cluster: Path) -> None:
    for box in layout.HOSTS:
        with urllib.request.urlopen(f"http://127.0.0.1:{box.proxy_port}/_aube/health", timeout=5) as r:
            assert r.status == 200, box.name
        with urllib.request.urlopen(f"http://127.0.0.1:{box.operator_port}/_aube/metrics", timeout=5) as r:
            assert b"aube_" in r.read(), box.name


def test_each_inner_engine_runs_a_container(cluster: Path) -> None:
    for box in layout.HOSTS:
        driver = _docker("exec", box.name, "docker", "info", "--format", "{{.Driver}}")
        assert driver.stdout.strip() == "overlay2", (box.name, driver.stderr)
        started = time.monotonic()
        ran = _docker(
            "exec", box.name, "docker", "run", "--rm", "--network", "none", layout.BASE_IMAGE,
            "python3", "-c", "print('ran')",
        )  # fmt: skip
        print(f"{box.name}: a container ran in {time.monotonic() - started:.2f}s")
        assert ran.returncode == 0 and ran.stdout.strip() == "ran", (box.name, ran.stderr)


def test_a_port_published_on_one_host_is_reached_from_another(cluster: Path) -> None:
    """As instances will be: published on the host's address on the rig network, dialled by other hosts."""
    first, second = layout.HOSTS[0], layout.HOSTS[1]
    address = _docker("exec", first.name, "hostname", "-i").stdout.split()[0]
    name = f"rig-smoke-{uuid.uuid4().hex[:8]}"
    published = _docker(
        "exec", first.name, "docker", "run", "-d", "--name", name, "-p", f"{address}::8080", layout.BASE_IMAGE,
        "python3", "-m", "http.server", "8080",
    )  # fmt: skip
    assert published.returncode == 0, published.stderr
    try:
        port = _docker("exec", first.name, "docker", "port", name, "8080").stdout.split(":")[-1].strip()
        fetch = (
            "import time, urllib.request\n"
            "for _ in range(50):\n"
            "    try:\n"
            f"        print(urllib.request.urlopen('http://{address}:{port}/', timeout=2).status); break\n"
            "    except OSError: time.sleep(0.1)\n"
        )
        reached = _docker("exec", second.name, "python3", "-c", fetch)
        assert reached.stdout.strip() == "200", (reached.stdout, reached.stderr)
    finally:
        _docker("exec", first.name, "docker", "rm", "-f", name)


def test_the_plane_runs_its_services(cluster: Path) -> None:
    listed = json.loads((cluster / layout.PLANE.name / rig_state.SERVICES_FILE).read_text())["services"]
    assert "reaper" in {s["name"] for s in listed}
    deadline = time.monotonic() + 30
    while True:
        processes = _docker("exec", layout.PLANE.name, "ps", "-eo", "args").stdout
        if "-m aube.reaper" in processes or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert "-m aube.reaper" in processes
