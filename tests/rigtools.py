"""What the rig's suites (tests/cluster) share: the registry as the platform sees it, functions deployed with
scripts/upload.sh, whoami clients on the three proxies, faults on the rig's containers and how to undo them."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path

from nats.aio.client import Client as NATS
from rig import layout
from rig import state as rig_state
from websockets.asyncio.client import ClientConnection, connect

from aube.shared import credentials, natsconn
from aube.shared.registry import Registry

CHECKOUT = Path(__file__).resolve().parents[1]
CLUSTER_SH = CHECKOUT / "scripts" / "cluster.sh"


PARTITION_MARK = "aube-rig-partition"  # the comment on the rules `partition` adds, so `rejoin` removes only those


def heal() -> None:
    """Every container back as `up` wants it: partitions undone, started again if killed, unpaused if paused
    (scripts/rig/containers); then wait until the platform answers a deployer again (`aube ls`), so the next test
    starts on a platform that works (a node back from a partition may take a while to be current)."""
    for name in [n.name for n in layout.NATS_NODES] + [b.name for b in layout.BOXES]:
        rejoin(name)
    subprocess.run([str(CLUSTER_SH), "up"], check=True, capture_output=True, timeout=600)
    started = time.monotonic()
    while (listed := aube(rig_state.folder(CHECKOUT), "ls")).returncode != 0:
        assert time.monotonic() - started < 120, f"the platform did not answer after healing: {listed.stderr}"
        time.sleep(1)
    print(f"platform answering {time.monotonic() - started:.1f}s after the rig was healed")


def _deployer_env(cluster: Path) -> dict[str, str]:
    path = cluster / rig_state.CREDENTIALS_FILE
    values = dict(line.split("=", 1) for line in path.read_text().splitlines())
    return {**os.environ, "AUBE_CREDENTIALS": str(path), "AUBE_NATS_URL": values["AUBE_NATS_URL"]}


def aube(cluster: Path, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The aube CLI as the rig's deployer."""
    return subprocess.run(
        [str(CHECKOUT / ".venv" / "bin" / "aube"), *argv],
        capture_output=True,
        text=True,
        env=_deployer_env(cluster),
        timeout=timeout,
        check=False,
    )


def _iptables_in(name: str) -> list[str] | None:
    """iptables in a running container's network namespace, run from this machine (the NATS image is the binary
    alone: it has no iptables of its own). None if the container is not running."""
    found = docker("inspect", "-f", "{{.State.Pid}}", name)
    pid = found.stdout.strip()
    if found.returncode != 0 or pid in ("", "0"):
        return None
    return ["nsenter", "-t", pid, "-n", "iptables", "-w"]


def _partition_rules() -> list[list[str]]:
    mark = ["-m", "comment", "--comment", PARTITION_MARK, "-j", "DROP"]
    return [["INPUT", "!", "-i", "lo", *mark], ["OUTPUT", "!", "-o", "lo", *mark]]


def partition(name: str) -> None:
    """Cut a container off the network: every packet into or out of its namespace but loopback's is dropped, with
    no reset, as when a host's link fails. Its processes run on; `rejoin` undoes it."""
    iptables = _iptables_in(name)
    assert iptables is not None, f"{name} is not running"
    for rule in _partition_rules():
        subprocess.run([*iptables, "-I", *rule], check=True, capture_output=True, timeout=30)


def rejoin(name: str) -> None:
    """Undo `partition` (every copy of its rules); nothing if the container is not running or was never cut off."""
    iptables = _iptables_in(name)
    if iptables is None:
        return
    for rule in _partition_rules():
        while subprocess.run([*iptables, "-D", *rule], capture_output=True, timeout=30, check=False).returncode == 0:
            pass


def inject(fault: str, name: str) -> None:
    """One fault on a rig container: `kill` (docker kill), `pause` (docker pause: its processes frozen, its kernel
    still answering TCP) or `partition`."""
    if fault == "partition":
        partition(name)
    else:
        assert fault in ("kill", "pause"), fault
        done = docker(fault, name)
        assert done.returncode == 0, done.stderr


def docker(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *argv], capture_output=True, text=True, timeout=timeout, check=False)


def monitor(node: layout.NatsNode, path: str) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.monitor_port}{path}", timeout=5) as r:
        found: dict[str, object] = json.loads(r.read())
        return found


async def platform_nats(cluster: Path, url: str | None = None) -> NATS:
    """A connection with the control plane's login (the registry is the platform account's), 2 s pings."""
    login = credentials.platform_secrets(cluster).service_login("controlplane")
    return await natsconn.connect(
        url or layout.client_url(), user=login.user, password=login.password, name="rig-faults", connect_timeout=5
    )


def deploy(cluster: Path, tmp_path: Path, name: str, manifest: str) -> str:
    """The whoami example under `name` with `manifest`, deployed as a deployer would: scripts/upload.sh with the
    rig's credentials file. Returns the printed stream URL."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "fn.py").write_text((CHECKOUT / "examples" / "whoami" / "fn.py").read_text())
    (folder / "aube.toml").write_text(manifest)
    started = time.monotonic()
    while True:
        done = subprocess.run(
            [str(CHECKOUT / "scripts" / "upload.sh"), str(folder), name],
            capture_output=True,
            text=True,
            env=_deployer_env(cluster),
            timeout=300,
            check=False,
        )
        # `unavailable` says "retry shortly" (the registry did not answer), and a deployer's script would.
        if "error: unavailable:" not in done.stderr or time.monotonic() - started > 60:
            break
        time.sleep(1)
    assert done.returncode == 0, done.stderr
    print(f"{name} deployed in {time.monotonic() - started:.1f}s: {done.stdout.strip()}")
    return done.stdout.strip()


def undeploy(cluster: Path, name: str) -> None:
    aube(cluster, "delete", name)


def proxy_url(box: layout.Box, function: str) -> str:
    return f"ws://127.0.0.1:{box.proxy_port}/{function}"


async def open_stream(box: layout.Box, function: str, timeout: float = 15) -> ClientConnection:
    return await connect(proxy_url(box, function), proxy=None, open_timeout=timeout, ping_interval=None)


async def ask(ws: ClientConnection, text: str) -> dict[str, object]:
    """One whoami round trip: which instance answered and how many streams it carries (1 unless two share it)."""
    await ws.send(text)
    reply: dict[str, object] = json.loads(await ws.recv())
    assert reply["echo"] == text
    return reply


async def hosts_of(registry: Registry, function: str, state: str | None = None) -> Counter[str]:
    return Counter(
        e.record.host for e in await registry.instances(function) if state is None or e.record.state == state
    )


async def host_by_instance(registry: Registry, function: str) -> dict[str, str]:
    return {e.record.instance_id: e.record.host for e in await registry.instances(function)}
