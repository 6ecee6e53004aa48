"""What the control plane needs from a place that runs instances: the Runtime protocol and its Structs.

Two runtimes implement it: `docker` (production: one hardened container per instance) and `process` (the
embedded default without Docker: one child process per instance, in bubblewrap where available). Both run the
same in-instance server (`aube.instance`) configured by the environment variables in `instance_environment`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import msgspec

from aube.controlplane.bounds import message_bytes
from aube.shared import names
from aube.shared.schemas import Manifest, RuntimeKind

# Where the in-instance server listens inside a container; the process runtime picks a free port instead.
INSTANCE_PORT = 8080

BuildLog = Callable[[str], None]
# Called on the event loop with an instance's handle the moment the runtime sees it end; must not block.
ExitListener = Callable[[str], None]


class InstanceSpec(msgspec.Struct, frozen=True, kw_only=True):
    function: str
    version: int
    slot: int
    instance_id: str
    artifact: str  # what `prepare` returned
    manifest: Manifest
    owner: str
    # The instance credential: the instance gets its SHA-256 only (see `instance_environment`). Empty: none asked.
    secret: str = ""
    # The function's tenant ("" = the operator's): whose `aube logs` the instance's output goes to (output.py).
    tenant: str = ""


class StartedInstance(msgspec.Struct, frozen=True, kw_only=True):
    instance_id: str
    handle: str  # container id or pid
    address: str  # "host:port" reachable from the proxies
    host: str = ""  # the host agent running it (the `hosts` runtime); "" = this machine
    # Host path of its handoff socket when it is not beside a Unix address (Docker: runtimes/handoffdir.py); "" none.
    handoff: str = ""


class RunningInstance(msgspec.Struct, frozen=True, kw_only=True):
    """An instance the runtime found carrying Aube's labels (or environment markers) for one owner."""

    handle: str
    instance_id: str
    function: str
    version: int
    slot: int
    alive: bool


class Inventory(msgspec.Struct, frozen=True, kw_only=True):
    """One listing of an owner's instances, and the hosts it covers (an InstanceRecord's `host`).

    `hosts` None: this machine's instances (records with no host). Otherwise the hosts that answered this very
    listing: a host absent from it (its lease looked expired to the control plane, say during a NATS election that
    kept every lease from being renewed) says nothing about its instances, so reconcile must not take its entries
    for instances gone. Judging a host dead is the reaper's, by its own rule."""

    instances: list[RunningInstance]
    hosts: frozenset[str] | None = None

    def covers(self, host: str) -> bool:
        # A record not placed yet ("") is starting: reconcile's own rules for starting entries apply to it.
        return not host or (self.hosts is not None and host in self.hosts)


class Artifact(msgspec.Struct, frozen=True, kw_only=True):
    """A prepared function version (an image, or a folder for the process runtime)."""

    ref: str
    function: str
    version: int


class Runtime(Protocol):
    kind: RuntimeKind

    async def prepare(
        self, name: str, version: int, bundle_dir: Path, manifest: Manifest, owner: str, log: BuildLog
    ) -> str:
        """Build what instances of this version start from; raise BuildFailed with the build output."""
        ...

    async def remove_artifact(self, ref: str) -> None:
        """Remove a prepared version; a missing one is not an error."""
        ...

    async def artifacts(self, owner: str) -> list[Artifact]: ...

    async def start(self, spec: InstanceSpec) -> StartedInstance:
        """Start one instance; raise RuntimeFailure (and leave nothing behind) if it cannot start."""
        ...

    async def stop(self, handle: str) -> None:
        """Stop and remove an instance; a missing one is not an error."""
        ...

    async def is_alive(self, handle: str) -> bool: ...

    async def instances(self, owner: str) -> list[RunningInstance]: ...

    async def inventory(self, owner: str) -> Inventory:
        """`instances`, and which hosts that listing speaks for: reconcile judges only those hosts' entries."""
        ...

    async def watch_exits(self, owner: str, exited: ExitListener) -> None:
        """Call `exited(handle)` as soon as an instance of `owner` ends (killed, crashed or stopped), until cancelled.

        Covers instances started before the call (also by an earlier control plane) and after it. An exit may be
        reported more than once, and one that happens while the watch is down (the engine restarting) may be missed:
        reconcile stays the backstop. Raises RuntimeFailure when the runtime cannot be watched at all.
        """
        ...

    async def close(self) -> None: ...


def instance_environment(spec: InstanceSpec, port: int) -> dict[str, str]:
    """The in-instance server's configuration, plus the function's own `[env]` (which cannot override it)."""
    fn = spec.manifest.function
    env = dict(spec.manifest.env)
    env.update(
        {
            names.ENV_INSTANCE_ID: spec.instance_id,
            names.ENV_FUNCTION: spec.function,
            names.ENV_VERSION: str(spec.version),
            "AUBE_INSTANCE_PORT": str(port),
            "AUBE_FN_RUNTIME": fn.runtime,
            "AUBE_FN_COMMAND": json.dumps(fn.command),
            "AUBE_FN_MODE": fn.mode,
            names.ENV_PING_INTERVAL: f"{spec.manifest.limits.ping_interval:g}",
            names.ENV_PING_TIMEOUT: f"{spec.manifest.limits.ping_timeout:g}",
            names.ENV_MAX_MESSAGE: str(message_bytes(spec.manifest.limits)),
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    if spec.secret:
        env[names.ENV_INSTANCE_SECRET_SHA256] = hashlib.sha256(spec.secret.encode()).hexdigest()
    else:
        env.pop(names.ENV_INSTANCE_SECRET_SHA256, None)  # nor may the function's own [env] set one
    return env


def instance_labels(spec: InstanceSpec) -> dict[str, str]:
    return {
        names.LABEL_MANAGED: "true",
        names.LABEL_OWNER: spec.owner,
        names.LABEL_FUNCTION: spec.function,
        names.LABEL_VERSION: str(spec.version),
        names.LABEL_INSTANCE: spec.instance_id,
        names.LABEL_SLOT: str(spec.slot),
        names.LABEL_TENANT: spec.tenant,
    }
