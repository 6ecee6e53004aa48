"""Starting the rig's containers, each only when it is not already running as wanted, and waiting for them."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from rig import docker, layout
from rig.layout import Box, NatsNode


def volume(name: str) -> str:
    """A named volume with the rig's label (created when missing, kept as it is otherwise)."""
    docker.run(["volume", "create", "--label", f"{layout.LABEL}=true", name])
    return name


def ensure_network() -> None:
    if docker.inspect("network", layout.NETWORK) is None:
        docker.run(["network", "create", "--label", f"{layout.LABEL}=true", layout.NETWORK])


def nats_args(node: NatsNode, image: str, state: Path) -> list[str]:
    return [
        "--name", node.name, "--hostname", node.name, "--network", layout.NETWORK,
        # deploy/nats.conf takes the services' passwords from the environment.
        "--env-file", str(state / "platform.env"),
        "-p", f"127.0.0.1:{node.client_port}:{layout.NATS_CLIENT_PORT}",
        "-p", f"127.0.0.1:{node.monitor_port}:{layout.NATS_MONITOR_PORT}",
        "-v", f"{volume(node.name + '-store')}:{layout.NATS_STORE}",
        "-v", f"{state / node.name}:{layout.NATS_CONF}:ro",
        image, "-c", f"{layout.NATS_CONF}/node.conf",
    ]  # fmt: skip


def box_args(box: Box, image: str, state: Path, checkout: Path) -> list[str]:
    engine = ["-v", f"{volume(box.name + '-docker')}:/var/lib/docker"] if box.engine else []
    return [
        "--name", box.name, "--hostname", box.name, "--network", layout.NETWORK,
        "--init",  # tini as PID 1: it reaps what the services and the inner engine leave
        *layout.security_options(box), *engine,
        "-e", f"AUBE_RIG_ENGINE={int(box.engine)}",
        # The checkout read-only, without its data folder (every platform's secrets): the container's own state
        # is mounted on its own.
        "-v", f"{checkout}:{layout.CHECKOUT}:ro",
        "--mount", f"type=tmpfs,destination={layout.CHECKOUT}/.data",
        "-v", f"{state / box.name}:{layout.RIG_CONF}:ro",
        *layout.ports(box),
        image, f"{layout.CHECKOUT}/scripts/rig/container/entry.sh",
    ]  # fmt: skip


def ensure(name: str, args: list[str], image: str, files: list[Path], healthy: Callable[[], bool] | None = None) -> str:
    """Run the container `docker run -d <args>` unless it already runs with the same spec: the arguments, the
    id of its `image` and the content of `files` (its configuration). One that runs as wanted but fails `healthy`
    (a fault test killed its inner engine, say) is restarted. Returns what was done."""
    image_id = (docker.inspect("image", image) or {}).get("Id", "")
    h = hashlib.sha256(json.dumps([args, image_id]).encode())
    h.update(state_digest(files).encode())
    spec = h.hexdigest()[:16]
    current = docker.inspect("container", name)
    if current is not None and current["Config"]["Labels"].get(layout.SPEC_LABEL) == spec:
        if current["State"].get("Paused"):  # a fault test's `docker pause`
            docker.run(["unpause", name])
        if current["State"]["Running"] and (healthy is None or healthy()):
            return "running"
        if current["State"]["Running"]:
            docker.run(["restart", "-t", "2", name])
            return "restarted (unhealthy)"
        docker.run(["start", name])
        return "started again"
    if current is not None:
        docker.run(["rm", "-f", "-v", name])
    labels = ["--label", f"{layout.LABEL}=true", "--label", f"{layout.SPEC_LABEL}={spec}"]
    docker.run(["run", "-d", *labels, *args])
    return "replaced" if current is not None else "created"


def state_digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(f"{path}\n".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return None


def answers(url: str) -> bool:
    return http_status(url) == 200


def wait_until(what: str, check: Callable[[], bool], timeout: float, *, container: str) -> None:
    """Poll `check` until it holds; when time runs out (or the container stopped), end with its log's tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        state = docker.inspect("container", container)
        if state is None or not state["State"]["Running"]:
            break
        time.sleep(0.2)
    logs = docker.run(["logs", "--tail", "30", container], check=False)
    raise SystemExit(f"{what}: not ready after {timeout:g}s\n--- {container}:\n{logs.stdout}{logs.stderr}")


def engine_ready(box: Box) -> bool:
    return docker.exec_in(box.name, ["docker", "info", "--format", "{{.Driver}}"]).returncode == 0


def load_base_image(boxes: list[Box], say: docker.Say) -> None:
    """Give each inner engine that lacks it the base image (docker save once, docker load in each, in parallel)."""
    missing = [b for b in boxes if docker.exec_in(b.name, ["docker", "image", "inspect", layout.BASE_IMAGE]).returncode]
    if not missing:
        return
    say(f"loading {layout.BASE_IMAGE} into the inner engines of {', '.join(b.name for b in missing)}")
    with tempfile.NamedTemporaryFile(prefix="aube-rig-base-", suffix=".tar") as saved:
        docker.run(["save", "-o", saved.name, layout.BASE_IMAGE])
        loads = []
        for box in missing:
            with open(saved.name, "rb") as tar:
                command = ["docker", "exec", "-i", box.name, "docker", "load", "-q"]
                loads.append(
                    (box, subprocess.Popen(command, stdin=tar, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
                )
        for box, process in loads:
            out, _ = process.communicate()
            if process.returncode != 0:
                raise SystemExit(f"docker load into {box.name} failed: {out.decode(errors='replace')}")
