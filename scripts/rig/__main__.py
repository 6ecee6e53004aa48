"""The test rig on one machine (issue 10): `scripts/cluster.sh up|down|status` runs this.

    up       build what images are missing, then start what is not running as wanted: the network, three NATS
             nodes, the plane, three Docker-in-Docker hosts; wait until NATS is current, the inner engines answer
             and each proxy is healthy. Idempotent: a second `up` changes nothing. Each phase is timed.
    down     remove every container, volume and the network the rig made (by its label), and .data/cluster.
             Images stay (their tags are digests of what they are made of).
    compose-image  build the host image when missing and tag it aube-platform:local, deploy/compose.yaml's image.
    status   each container's state, each NATS node's cluster and JetStream view, services, engines, proxies.

What runs where is scripts/rig/layout.py; the rig's state (secrets, rendered configurations) is .data/cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from rig import containers, docker, images, layout, state, status

CHECKOUT = Path(__file__).resolve().parents[2]
NATS_READY_TIMEOUT = 60.0
ENGINE_READY_TIMEOUT = 90.0
PROXY_READY_TIMEOUT = 90.0


def say(line: str) -> None:
    print(f"rig: {line}", flush=True)


@contextlib.contextmanager
def phase(name: str, timings: dict[str, float]) -> Iterator[None]:
    started = time.monotonic()
    yield
    timings[name] = time.monotonic() - started
    say(f"{name}: {timings[name]:.1f}s")


def up() -> None:
    timings: dict[str, float] = {}
    started = time.monotonic()
    with phase("images", timings):
        nats_image = images.nats_image(say)
        host_image = images.host_image(sys.executable, say, timings)
        _ensure_base_image()
    with phase("state", timings):
        containers.ensure_network()
        prepared = state.prepare(CHECKOUT)
        say(f"NATS node configurations from {prepared.template}")
        for service, why in prepared.skipped.items():
            say(f"not running {service}: {why}")
    with phase("nats", timings):
        for node in layout.NATS_NODES:
            files = [*(prepared.state / node.name).iterdir(), prepared.state / "platform.env"]
            did = containers.ensure(
                node.name, containers.nats_args(node, nats_image, prepared.state), nats_image, files
            )
            say(f"{node.name}: {did}")
        for node in layout.NATS_NODES:
            containers.wait_until(
                f"{node.name} current with a JetStream meta leader",
                partial(containers.answers, f"http://127.0.0.1:{node.monitor_port}/healthz"),
                NATS_READY_TIMEOUT,
                container=node.name,
            )
    with phase("boxes", timings):
        for box in layout.BOXES:
            args = containers.box_args(box, host_image, prepared.state, CHECKOUT)
            healthy = partial(containers.engine_ready, box) if box.engine else None
            did = containers.ensure(box.name, args, host_image, [*(prepared.state / box.name).iterdir()], healthy)
            say(f"{box.name}: {did}")
    hosts = [box for box in layout.BOXES if box.engine]
    with phase("inner engines", timings):
        for box in hosts:
            containers.wait_until(
                f"{box.name}'s inner engine",
                partial(containers.engine_ready, box),
                ENGINE_READY_TIMEOUT,
                container=box.name,
            )
        containers.load_base_image(hosts, say)
    with phase("proxies", timings):
        for box in hosts:
            containers.wait_until(
                f"{box.name}'s proxy",
                partial(containers.answers, f"http://127.0.0.1:{box.proxy_port}/_aube/health"),
                PROXY_READY_TIMEOUT,
                container=box.name,
            )
    say(f"up in {time.monotonic() - started:.1f}s ({', '.join(f'{k} {v:.1f}s' for k, v in timings.items())})")
    creds = prepared.state / state.CREDENTIALS_FILE
    say(f"deployer: AUBE_CREDENTIALS={creds.relative_to(CHECKOUT)} AUBE_NATS_URL={layout.client_url()}")


def _ensure_base_image() -> None:
    """aube-base:bookworm in the machine's engine, built as the docker runtime builds it when missing."""
    if docker.inspect("image", layout.BASE_IMAGE) is not None:
        return
    import docker as docker_sdk

    from aube.controlplane.runtimes.images import ensure_base_image
    from aube.shared.settings import ControlPlaneSettings

    client = docker_sdk.from_env(timeout=600)
    try:
        ensure_base_image(client, ControlPlaneSettings(base_image=layout.BASE_IMAGE), say)
    finally:
        client.close()


def down() -> None:
    started = time.monotonic()
    names = docker.labelled("container", layout.LABEL)
    if names:
        docker.run(["rm", "-f", "-v", *names])
    volumes = docker.labelled("volume", layout.LABEL)
    if volumes:
        docker.run(["volume", "rm", *volumes])
    if docker.inspect("network", layout.NETWORK) is not None:
        docker.run(["network", "rm", layout.NETWORK])
    shutil.rmtree(state.folder(CHECKOUT), ignore_errors=True)
    say(f"down in {time.monotonic() - started:.1f}s: {len(names)} containers, {len(volumes)} volumes removed")


def main() -> None:
    parser = argparse.ArgumentParser(prog="scripts/cluster.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "compose-image"])
    command = parser.parse_args().command
    if command == "up":
        up()
    elif command == "down":
        down()
    elif command == "compose-image":
        images.compose_image(sys.executable, say)
    else:
        status.show()


if __name__ == "__main__":
    main()
