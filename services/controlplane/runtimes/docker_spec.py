"""What the Docker runtime asks the engine for when it creates an instance's container: pure, no engine calls.

A container runs the in-instance server as nobody (65534) on a read-only root with all capabilities dropped,
no-new-privileges, memory/cpu/pids limits from the manifest, a small /tmp tmpfs, and its port published on
`publish_host` only (127.0.0.1 by default) at a random host port. It joins the instance network (`instancenet`),
and its handoff folder (handoffdir.py) is bind-mounted at `handoffdir.CONTAINER_DIR`.

`host_config_options` is handed to the SDK's `create_host_config`, `container_options` to `create_container`;
bench/docker_starts.py starts containers from the same options to measure the engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
