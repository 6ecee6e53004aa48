"""The messages between the control plane (`hosts.HostsRuntime`) and a host's agent (services/agent): the Runtime
protocol carried over NATS request/reply on `aube.host.<host id>.<operation>`, one Struct per operation.

Handles and artifact refs cross the wire in the control plane's form: a handle is `<host id>/<the host's own
handle>`, so a stop or a liveness question finds its host; an artifact is `hosts:<function>:v<version>`, the same on
every host, which each agent maps to what it prepared itself (an image of its own engine, a folder of its own disk).
"""

from __future__ import annotations

import msgspec

from aube.controlplane.runtimes.base import Artifact, InstanceSpec, RunningInstance, StartedInstance
from aube.shared import names
from aube.shared.schemas import Manifest

OP_PREPARE = "prepare"
OP_START = "start"
OP_STOP = "stop"
OP_ALIVE = "alive"
OP_LIST = "list"
OP_REMOVE_ARTIFACT = "remove-artifact"
OPERATIONS = (OP_PREPARE, OP_START, OP_STOP, OP_ALIVE, OP_LIST, OP_REMOVE_ARTIFACT)
# Each agent's NATS user may subscribe to exactly these (aube.shared.agentlogins).
assert OPERATIONS == names.HOST_OPERATIONS

ARTIFACT_PREFIX = "hosts:"


def artifact_ref(function: str, version: int) -> str:
    return f"{ARTIFACT_PREFIX}{function}:v{version}"


def parse_artifact_ref(ref: str) -> tuple[str, int] | None:
    """(function, version) of a host-independent artifact ref; None for any other string."""
    if not ref.startswith(ARTIFACT_PREFIX):
        return None
    function, sep, version = ref[len(ARTIFACT_PREFIX) :].rpartition(":v")
    if not sep or not function or not version.isdigit():
        return None
    return function, int(version)


def bundle_key(owner: str, function: str, version: int) -> str:
    """Where a version's validated folder (a tar) waits in BUCKET_ARTIFACTS for the hosts that prepare it."""
    return f"{owner}/{function}/v{version}.tar"


def host_handle(host_id: str, handle: str) -> str:
    return f"{host_id}/{handle}"


def split_handle(handle: str) -> tuple[str, str]:
    """(host id, the host's handle); ("", handle) for a handle without a host."""
    host, sep, local = handle.partition("/")
    return (host, local) if sep else ("", handle)


class PrepareOnHost(msgspec.Struct, frozen=True, kw_only=True):
    function: str
    version: int
    manifest: Manifest
    owner: str


class Prepared(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool = True
    log: list[str] = msgspec.field(default_factory=list)  # the build's output (bounded)


class StartOnHost(msgspec.Struct, frozen=True, kw_only=True):
    spec: InstanceSpec  # its artifact is the host-independent ref


class Started(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool = True
    instance: StartedInstance  # the host's own handle; the control plane prefixes the host


class HandleOnHost(msgspec.Struct, frozen=True, kw_only=True):
    handle: str  # the host's own handle


class Alive(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool = True
    alive: bool


class Done(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool = True


class ListOnHost(msgspec.Struct, frozen=True, kw_only=True):
    owner: str


class Listing(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool = True
    instances: list[RunningInstance] = msgspec.field(default_factory=list)  # the host's own handles
    artifacts: list[Artifact] = msgspec.field(default_factory=list)  # host-independent refs


class RemoveArtifactOnHost(msgspec.Struct, frozen=True, kw_only=True):
    owner: str
    ref: str  # host-independent


class Exited(msgspec.Struct, frozen=True, kw_only=True):
    """Published by an agent on `aube.host.<id>.exited` when one of the owner's instances ends (or is found gone)."""

    owner: str
    handle: str  # the host's own handle
