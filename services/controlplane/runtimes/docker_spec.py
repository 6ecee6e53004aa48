"""What the Docker runtime asks the engine for when it creates an instance's container: pure, no engine calls.

A container runs the in-instance server as nobody (65534) on a read-only root with all capabilities dropped,
no-new-privileges, memory/cpu/pids limits from the manifest, a small /tmp tmpfs, and its port published on
`publish_host` only (127.0.0.1 by default) at a random host port. It joins the instance network (`instancenet`),
and its handoff folder (handoffdir.py) is bind-mounted at `handoffdir.CONTAINER_DIR`.

`host_config_options` is handed to the SDK's `create_host_config`, `container_options` to `create_container`;
bench/docker_starts.py starts containers from the same options to measure the engine. The rest reads what the
engine answers: a published port, a number in a label, an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import docker.errors
import requests.exceptions
from docker.types import LogConfig

from aube.controlplane.bounds import memory_bytes, nano_cpus
from aube.controlplane.runtimes import handoffdir, images
from aube.controlplane.runtimes.base import INSTANCE_PORT, InstanceSpec, instance_environment, instance_labels
from aube.shared import addresses
from aube.shared.schemas import LimitsSection
from aube.shared.settings import ControlPlaneSettings

PORT_KEY = f"{INSTANCE_PORT}/tcp"
# Seconds between SIGTERM and SIGKILL: enough for the server to close its stream with 1001 (going away).
STOP_GRACE = 5
# A start keeps its turn (DockerRuntime.start) until the server in its container listens, this long at most. When
# dozens of interpreters start at once on a small machine each takes half a minute (a burst of 48 at load 28: 25-42 s
# each), so the first of a burst come up no sooner than the last; in turns they come up one batch after another.
# Bounded, so that a function whose server never listens holds up other starts for no longer than this.
SERVER_WAIT_IN_TURN = 10.0


def host_config_options(
    limits: LimitsSection, settings: ControlPlaneSettings, handoff: Path, *, init: bool
) -> dict[str, Any]:
    """The keyword arguments of `create_host_config` for one instance; ValueError for a limit that does not parse."""
    # In bytes, parsed the way the upload checked it (Docker's own parser reads "512Mi" or "1t" otherwise).
    memory = memory_bytes(limits.memory)
    return {
        "port_bindings": {PORT_KEY: (settings.publish_host, None)},
        "read_only": True,
        "tmpfs": {"/tmp": "rw,nosuid,nodev,size=64m"},
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "mem_limit": memory,
        "memswap_limit": memory,  # no swap on top of the memory limit
        "nano_cpus": nano_cpus(limits.cpus),
        "pids_limit": limits.pids,
        # None, not False: an engine without docker-init refuses the key itself.
        "init": True if init else None,
        "network_mode": settings.instance_network,
        "log_config": LogConfig(type="json-file", config={"max-size": "1m", "max-file": "2"}),
        "binds": {str(handoff): {"bind": handoffdir.CONTAINER_DIR, "mode": "rw"}},
    }


def container_options(spec: InstanceSpec, name: str, host_config: Any) -> dict[str, Any]:
    """The keyword arguments of `create_container` (after the image, `spec.artifact`) for one instance."""
    return {
        "name": name,
        "user": images.NOBODY,
        "labels": instance_labels(spec),
        "environment": {
            **instance_environment(spec, INSTANCE_PORT),
            handoffdir.ENV_HANDOFF: f"{handoffdir.CONTAINER_DIR}/{addresses.HANDOFF_SOCKET_NAME}",
        },
        "ports": [INSTANCE_PORT],
        "host_config": host_config,
        "stop_timeout": STOP_GRACE,
        "use_config_proxy": False,
    }


def published_port(info: dict[str, Any]) -> int | None:
    """The host port Docker picked for the instance port, from the container's inspection; None if there is none."""
    for binding in ((info.get("NetworkSettings") or {}).get("Ports") or {}).get(PORT_KEY) or []:
        if binding.get("HostPort"):
            return int(binding["HostPort"])
    return None


def label_int(value: object) -> int:
    """A number from a label; -1 when it is not one (reconcile then sees a container it does not know)."""
    try:
        return int(str(value))
    except ValueError:
        return -1


def explain(e: BaseException) -> str:
    """What a Docker SDK error says, for a RuntimeFailure's message."""
    if isinstance(e, docker.errors.APIError):
        return str(e.explanation or e)
    if isinstance(e, requests.exceptions.Timeout):
        return f"the Docker engine did not answer in time ({e})"
    if isinstance(e, requests.exceptions.ConnectionError):
        return f"cannot reach the Docker engine ({e})"
    return str(e) or type(e).__name__
