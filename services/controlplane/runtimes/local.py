"""Choosing this machine's runtime: the control plane's on a single machine, and each host agent's in a cluster."""

from __future__ import annotations

import logging

from aube.controlplane.runtimes.base import Runtime
from aube.shared.errors import InvalidRequest, RuntimeFailure
from aube.shared.settings import ControlPlaneSettings

log = logging.getLogger(__name__)


async def select_local_runtime(settings: ControlPlaneSettings) -> Runtime:
    """`auto` prefers Docker and falls back to processes when no engine answers."""
    if settings.runtime == "hosts":
        raise InvalidRequest("AUBE_RUNTIME=hosts places instances on host agents; a host runs docker or process")
    if settings.runtime in ("auto", "docker"):
        from aube.controlplane.runtimes.docker import DockerRuntime

        try:
            return await DockerRuntime.connect(settings)
        except RuntimeFailure as e:
            if settings.runtime == "docker":
                raise
            log.warning("the Docker runtime is unavailable (%s): instances run as local processes", e)
    from aube.controlplane.runtimes.process import ProcessRuntime

    return ProcessRuntime(settings)
