"""Every name two processes must agree on: subjects, buckets, KV keys, labels, headers, the name pattern.

Nothing else in the project spells one of these strings.
"""

from __future__ import annotations

import re

from aube.shared.errors import InvalidName

# A function name is a DNS label: safe as a URL path, a KV key token, a container name part and an image tag.
# A leading underscore can never match, which keeps `/_aube/...` free for the proxy's own endpoints.
NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

# Request/reply subjects. The contract names the first three; the rest are the services' own.
SUBJECT_UPLOAD = "aube.fn.upload"
SUBJECT_DELETE = "aube.fn.delete"
SUBJECT_LIST = "aube.fn.list"
SUBJECT_SCALE = "aube.fn.scale"
SUBJECT_STOP_INSTANCE = "aube.instance.stop"
SUBJECT_EVENTS_PREFIX = "aube.events.fn"
# Instances' output (`aube logs`): lines on aube.logs.fn.<name>.<origin>, where <origin> is the host id of the agent
# that read them, or LOGS_LOCAL_ORIGIN for the control plane's own runtime; kept for --since in STREAM_LOGS and
# served by the control plane on SUBJECT_LOGS.
SUBJECT_LOGS = "aube.fn.logs"
SUBJECT_LOGS_PREFIX = "aube.logs.fn"
LOGS_LOCAL_ORIGIN = "_local"  # never a host id (HOST_ID_PATTERN has no underscore)
STREAM_LOGS = "aube-logs"

# Queue groups, so that running a second copy of a service shares the work instead of doubling it.
QUEUE_CONTROLPLANE = "aube-controlplane"

# JetStream buckets.
BUCKET_INSTANCES = "aube-instances"  # key "<function>.<slot>" -> InstanceRecord
BUCKET_FUNCTIONS = "aube-functions"  # key "<function>" -> FunctionRecord
BUCKET_LEASES = "aube-leases"  # key "<proxy id>" -> ProxyLease, renewed by its proxy
BUCKET_SCALE_INTENTS = "aube-scale-intents"  # key "<function>" -> ScaleIntent: one replica per window asks to scale
# The scale-intents bucket's max_age, in seconds: an intent nobody takes over (its function deleted, the platform
# stopped) vanishes this long after it was written, whatever the writers' clocks said. Also the longest window an
# intent may hold (records.py). Part of the bucket's configuration, which every service creating the bucket must
# spell alike: the server refuses to create a stream again with a different one.
SCALE_INTENT_MAX_AGE = 600.0
BUCKET_BUNDLES = "aube-bundles"  # object store for uploads above the NATS max payload
BUCKET_HOSTS = "aube-hosts"  # key "<host id>" -> HostLease, renewed by that host's agent
BUCKET_ARTIFACTS = "aube-artifacts"  # object store: validated function folders, which each host prepares itself

# Host agents (services/agent): each answers `aube.host.<host id>.<operation>` and publishes the exits it sees on
# `aube.host.<host id>.exited`.
SUBJECT_HOST_PREFIX = "aube.host"
HOST_EXITS = "exited"
# What a host's agent answers (the control plane's HostsRuntime asks): aube.host.<host id>.<operation>.
HOST_OPERATIONS = ("prepare", "start", "stop", "alive", "list", "remove-artifact")
HOST_ID_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")

# Docker labels and process-runtime markers. Everything Aube creates carries LABEL_MANAGED.
LABEL_MANAGED = "aube.managed"
LABEL_FUNCTION = "aube.function"
LABEL_VERSION = "aube.version"
LABEL_INSTANCE = "aube.instance"
LABEL_SLOT = "aube.slot"
LABEL_TENANT = "aube.tenant"  # whose output the instance writes (aube logs)
LABEL_OWNER = "aube.owner"  # which control plane started it; lets tests run several platforms side by side
LABEL_TEST = "aube.test"

# The proxy's own endpoints; NAME_PATTERN can never produce them.
PATH_HEALTH = "/_aube/health"
PATH_METRICS = "/_aube/metrics"
PATH_DASHBOARD = "/_aube/dashboard"  # the page; its files and its state are under it
# The in-instance server answers health checks on the same path.
INSTANCE_HEALTH_PATH = PATH_HEALTH

ENV_INSTANCE_ID = "AUBE_INSTANCE_ID"
ENV_FUNCTION = "AUBE_FUNCTION"
ENV_VERSION = "AUBE_VERSION"
# The ping policy (`[limits] ping_interval` / `ping_timeout`), read by `aube.instance.config`.
ENV_PING_INTERVAL = "AUBE_PING_INTERVAL"
ENV_PING_TIMEOUT = "AUBE_PING_TIMEOUT"
ENV_MAX_MESSAGE = "AUBE_MAX_MESSAGE"  # bytes

# The instance credential: the proxy and the health probe present the secret in this header; the instance is given
# only the secret's SHA-256 (hex) in this variable, so function code reading its environment learns nothing it could
# present. `aube.instance.config` spells both again (the instance ships without aube.shared); a unit test ties them.
HEADER_INSTANCE_SECRET = "X-Aube-Instance-Secret"
ENV_INSTANCE_SECRET_SHA256 = "AUBE_INSTANCE_SECRET_SHA256"

# The Docker network every instance container joins (created by the docker runtime, labelled LABEL_MANAGED): no
# traffic between containers, and a fixed bridge name so the host firewall rules can name its interface.
INSTANCE_NETWORK = "aube-instance-net"
INSTANCE_BRIDGE = "aube-inst0"


def validate_name(name: object) -> str:
    """Return `name` if it is a valid function name, else raise InvalidName saying why."""
    if not isinstance(name, str):
        raise InvalidName(f"function name must be a string, got {type(name).__name__}")
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidName(
            f"invalid function name {name[:80]!r}: use 1-63 characters of a-z, 0-9 and '-', "
            "starting and ending with a letter or digit"
        )
    return name


def events_subject(name: str) -> str:
    return f"{SUBJECT_EVENTS_PREFIX}.{name}"


def logs_subject(name: str, origin: str) -> str:
    return f"{SUBJECT_LOGS_PREFIX}.{name}.{origin}"


def host_subject(host_id: str, operation: str) -> str:
    return f"{SUBJECT_HOST_PREFIX}.{host_id}.{operation}"


def validate_host_id(host_id: str) -> str:
    """A host id is a subject token and a key: lower-case letters, digits and dashes, at most 32."""
    if not HOST_ID_PATTERN.fullmatch(host_id):
        raise InvalidName(f"host id {host_id[:80]!r} must be 1-32 lower-case letters, digits or dashes")
    return host_id


def instance_key(function: str, slot: int) -> str:
    return f"{function}.{slot}"


def instance_key_filter(function: str | None = None) -> str:
    return f"{function}.*" if function else ">"


def image_repository(owner: str, name: str) -> str:
    return f"aube-fn-{owner}-{name}"


def image_tag(owner: str, name: str, version: int) -> str:
    return f"{image_repository(owner, name)}:v{version}"


def container_name(owner: str, name: str, instance_id: str) -> str:
    return f"aube-{owner}-{name}-{instance_id}"


def firewall_chain(bridge: str) -> str:
    """The iptables chain holding the host-input rules for one instance bridge (at most 8 + 15 characters)."""
    return f"AUBE-IN-{bridge}"
