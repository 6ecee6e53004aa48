"""How many container starts the Docker engine does at once: N starts at concurrency 1, 2, 4, 8, 16 and unbounded.

Each start is what the Docker runtime does (runtimes/docker.py `_create_and_start`): create with the runtime's own
options (runtimes/docker_spec.py: read-only root, no capabilities, a published port, --init, a bind mount, ...),
start, inspect for the published port. The command is `sleep`, so the figures are the engine's alone, not the
instance server's start. For each concurrency: the time until all N run, and the per-start time (create to port
known) at p50 and max. Then, with --pause, what a paused reserve would cost instead: pause and unpause of the
same containers, one at a time.

    .venv/bin/python bench/docker_starts.py [--count 24] [--levels 1,2,4,8,16,0] [--pause]

Containers carry the label aube.bench=docker-starts and are removed at the end of each level. The results of a run
on the development machine (2 cores, Docker 20.10 on fuse-overlayfs, other sessions' load) are in bench/NOTES.md,
"Parallel Docker starts".
"""

from __future__ import annotations

import argparse
import concurrent.futures
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import docker

from aube.controlplane.runtimes import docker_spec
from aube.controlplane.runtimes.base import InstanceSpec
from aube.shared.schemas import Manifest
from aube.shared.settings import ControlPlaneSettings

LABEL = "aube.bench"
IMAGE = "aube-base:bookworm"


def one_start(client: Any, spec: InstanceSpec, handoff: Path) -> float:
    """Create, start and inspect one container the way the runtime does; seconds it took."""
    began = time.monotonic()
    settings = ControlPlaneSettings(instance_network="bridge")
    options = docker_spec.host_config_options(spec.manifest.limits, settings, handoff, init=True)
    host_config = client.api.create_host_config(**options)
    name = f"aube-bench-{spec.instance_id}"
    create = docker_spec.container_options(spec, name, host_config)
    create["labels"] = {LABEL: "docker-starts"}
    created = client.api.create_container(IMAGE, command=["sleep", "600"], **create)
    client.api.start(created["Id"])
    info = client.api.inspect_container(created["Id"])
    assert info["NetworkSettings"]["Ports"][docker_spec.PORT_KEY][0]["HostPort"]
    return time.monotonic() - began


def remove_all(client: Any) -> None:
    for c in client.api.containers(all=True, filters={"label": f"{LABEL}=docker-starts"}):
        client.api.remove_container(c["Id"], force=True)


def level(client: Any, count: int, concurrency: int, work: Path) -> tuple[float, list[float]]:
    specs = []
    for i in range(count):
        specs.append(
            InstanceSpec(
                function="bench",
                version=1,
                slot=i,
                instance_id=uuid.uuid4().hex[:12],
                artifact=IMAGE,
                manifest=Manifest(),
                owner="bench",
            )
        )
        (work / specs[-1].instance_id).mkdir()
    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency or count) as pool:
        times = list(pool.map(lambda s: one_start(client, s, work / s.instance_id), specs))
    return time.monotonic() - began, times


def pause_figures(client: Any) -> tuple[list[float], list[float]]:
    paused, unpaused = [], []
    for c in client.api.containers(filters={"label": f"{LABEL}=docker-starts"}):
        began = time.monotonic()
        client.api.pause(c["Id"])
        paused.append(time.monotonic() - began)
    for c in client.api.containers(filters={"label": f"{LABEL}=docker-starts"}):
        began = time.monotonic()
        client.api.unpause(c["Id"])
        unpaused.append(time.monotonic() - began)
    return paused, unpaused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--levels", default="1,2,4,8,16,0", help="concurrencies; 0 = unbounded (all at once)")
    parser.add_argument("--pause", action="store_true", help="also time pause and unpause of the last level's")
    args = parser.parse_args()
    # Enough connections for every thread (urllib3 keeps 10 per client otherwise, which would bound the test).
    client = docker.from_env(timeout=300, max_pool_size=args.count + 4)
    work = Path(tempfile.mkdtemp(prefix="aube-bench-starts-"))
    print(f"{args.count} starts of {IMAGE} (sleep) with the runtime's container options")
    print(f"{'concurrency':>11}  {'all running':>11}  {'per start p50':>13}  {'per start max':>13}")
    try:
        levels = [int(x) for x in args.levels.split(",")]
        for i, concurrency in enumerate(levels):
            remove_all(client)
            total, times = level(client, args.count, concurrency, work)
            label = str(concurrency) if concurrency else "unbounded"
            print(f"{label:>11}  {total:>10.1f}s  {statistics.median(times):>12.2f}s  {max(times):>12.2f}s", flush=True)
            if args.pause and i == len(levels) - 1:
                paused, unpaused = pause_figures(client)
                print(
                    f"pause p50 {statistics.median(paused) * 1000:.0f} ms, max {max(paused) * 1000:.0f} ms; "
                    f"unpause p50 {statistics.median(unpaused) * 1000:.0f} ms, max {max(unpaused) * 1000:.0f} ms"
                )
    finally:
        remove_all(client)
        shutil.rmtree(work, ignore_errors=True)
        client.close()


if __name__ == "__main__":
    main()
