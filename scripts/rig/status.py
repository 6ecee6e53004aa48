"""`scripts/cluster.sh status`: each container's state, each NATS node's cluster and JetStream view, each host's
services, inner engine and proxy. Read-only; a missing rig prints as missing."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from rig import docker, layout
from rig.containers import http_status
from rig.layout import Box, NatsNode


def container_state(name: str) -> str:
    found = docker.inspect("container", name)
    if found is None:
        return "missing"
    state = found["State"]
    if state.get("Paused"):
        return "paused"
    return "running" if state["Running"] else f"{state['Status']} (exit {state['ExitCode']})"


def _monitor(node: NatsNode, path: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.monitor_port}{path}", timeout=2) as r:
            found: dict[str, Any] = json.loads(r.read())
            return found
    except (OSError, ValueError):
        return None


def nats_line(node: NatsNode) -> str:
    """Its peers (routes to distinct servers: a route pool opens several per peer), the JetStream meta leader
    and cluster size as it sees them, and /healthz (200 once it is current with a meta leader)."""
    state = container_state(node.name)
    line = f"{node.name:<12} {state:<10} {node.url}"
    if state != "running":
        return line
    routes = _monitor(node, "/routez") or {}
    peers = sorted({r.get("remote_name") or r.get("remote_id", "?") for r in routes.get("routes") or []})
    jsz = (_monitor(node, "/jsz") or {}).get("meta_cluster") or {}
    health = http_status(f"http://127.0.0.1:{node.monitor_port}/healthz")
    line += f"  peers: {', '.join(peers) or 'none'}"
    line += f"  JetStream: leader {jsz.get('leader') or 'none'}, cluster of {jsz.get('cluster_size', '?')}"
    return line + f"  healthz: {'ok' if health == 200 else health}"


def services_running(box: Box) -> list[str]:
    result = docker.exec_in(box.name, ["ps", "-eo", "args"])
    running = []
    for line in result.stdout.splitlines():
        parts = line.split()
        if "-m" in parts and parts.index("-m") + 1 < len(parts) and parts[parts.index("-m") + 1].startswith("aube."):
            running.append(parts[parts.index("-m") + 1].removeprefix("aube."))
    return running


def box_line(box: Box) -> str:
    state = container_state(box.name)
    line = f"{box.name:<12} {state:<10}"
    if state != "running":
        return line
    line += f" services: {', '.join(services_running(box)) or 'none'}"
    if box.engine:
        inner = docker.exec_in(box.name, ["docker", "ps", "-q"])
        base = docker.exec_in(box.name, ["docker", "image", "inspect", layout.BASE_IMAGE]).returncode == 0
        if inner.returncode == 0:
            loaded = "loaded" if base else "missing"
            line += f"  inner engine: {len(inner.stdout.split())} containers, {layout.BASE_IMAGE} {loaded}"
        else:
            line += "  inner engine: not answering"
    if box.proxy_port is not None:
        health = http_status(f"http://127.0.0.1:{box.proxy_port}/_aube/health")
        line += f"  proxy 127.0.0.1:{box.proxy_port}: {'ok' if health == 200 else health}"
    return line


def show() -> None:
    network = "present" if docker.inspect("network", layout.NETWORK) is not None else "missing"
    print(f"network {layout.NETWORK}: {network}")
    for node in layout.NATS_NODES:
        print(nats_line(node))
    for box in layout.BOXES:
        print(box_line(box))
