"""One frozen settings object per service. Each field `x` is read from `AUBE_X` in the service's `__main__` only
and passed down; nothing else reads the environment.

Durations are seconds as floats; `None` (spelt "", "none" or "off" in the environment) disables a timer.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import msgspec

from aube.shared import names
from aube.shared.errors import InvalidRequest

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_PROXY_PORT = 8093
DEFAULT_OPERATOR_PORT = 9093
# The control plane's and the reaper's operator ports (/_aube/metrics): below the proxy's, whose replicas count up.
DEFAULT_CONTROLPLANE_OPERATOR_PORT = 9091
DEFAULT_REAPER_OPERATOR_PORT = 9092
DEFAULT_BASE_IMAGE = "aube-base:bookworm"

# How many copies JetStream keeps of each bucket (the registry's KV buckets, the bundle store): 1 on a single
# server, 3 in a cluster (deploy/cluster/), where a bucket then survives the loss of one node. JetStream allows 1-5,
# and a count above the cluster's size refuses to create the bucket.
KvReplicas = Annotated[int, msgspec.Meta(ge=1, le=5)]


def _default_data_dir() -> str:
    return str(Path.home() / ".local" / "share" / "aube")


def _default_node_id() -> str:
    return f"{socket.gethostname()[:20]}-{uuid.uuid4().hex[:6]}"


class ControlPlaneSettings(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str = DEFAULT_NATS_URL  # one server, or several separated by commas (a cluster's members)
    nats_user: str = ""  # empty: connect without credentials (a development server without accounts)
    nats_password: str = ""
    # The control plane sets the buckets' replica count: it creates them with it and updates an existing bucket's
    # count in place (aube.shared.buckets); only its NATS user may update streams.
    kv_replicas: KvReplicas = 1
    # The password of the `aube-fetch-<tenant>` users, with which the control plane reads a bundle a tenant put in
    # its own object store; empty: bundles are read from the control plane's own account (no tenant accounts).
    nats_fetch_password: str = ""
    # Where instances run: this machine's Docker engine or processes (`auto`: Docker when an engine answers), or
    # `hosts`: on the hosts whose agents (services/agent) hold a lease, placed across them (a cluster).
    runtime: Literal["auto", "docker", "process", "hosts"] = "auto"
    # With `runtime = hosts`: the kind of runtime the hosts must run (a function's record names it).
    host_runtime: Literal["docker", "process"] = "docker"
    # With `runtime = hosts`: how long a host may take to answer a request (a start includes the instance's start and,
    # on a host that lacks the version, its build).
    host_timeout: float = 300.0
    # Scope of this control plane's instances (labels, registry `owner`): reconcile only touches its own, so
    # several platforms (or test runs) can share one Docker engine.
    owner: str = "default"
    publish_host: str = "127.0.0.1"  # instance ports are published on this host address only
    advertise_host: str = "127.0.0.1"  # the address proxies dial to reach a published instance port
    public_url: str = f"ws://localhost:{DEFAULT_PROXY_PORT}"  # base of the stream URL in upload replies
    data_dir: str = msgspec.field(default_factory=_default_data_dir)
    base_image: str = DEFAULT_BASE_IMAGE  # built from Debian packages when missing, unless configured
    reconcile_interval: float = 10.0
    health_timeout: float = 30.0
    build_timeout: float = 900.0
    docker_timeout: float = 60.0
    # Docker: containers being created and started at once, each until its server listens (10 s at most); more starts
    # wait their turn (their registry entries say "starting" meanwhile, so waiting clients wait for them). The engine
    # serialises much of a start and the servers share the CPUs: in turns a burst's instances come up batch by batch
    # instead of all at the end (bench/NOTES.md, "Parallel Docker starts").
    docker_start_concurrency: Annotated[int, msgspec.Meta(ge=1)] = 8
    max_bundle_bytes: int = 64 * 1024 * 1024
    max_extracted_bytes: int = 256 * 1024 * 1024
    max_files: int = 4096
    delete_grace: float = 30.0  # seconds a busy instance may keep streaming after its function is deleted
    start_timeout: float = 120.0  # a "starting" slot older than this with no instance is reclaimed
    sandbox: Literal["auto", "bwrap", "none"] = "auto"  # process runtime isolation
    # Process runtime, sandboxed by a root control plane: fork each instance from a zygote per function version
    # that has imported the instance server, into its own bubblewrap sandbox (runtimes/zygote.py). "off": every
    # instance is a fresh interpreter, as without a sandbox or as an unprivileged control plane.
    zygote: Literal["on", "off"] = "on"
    # On a clean exit, stop this control plane's instances too (`make start` sets it: Ctrl-C leaves nothing running).
    # Off, instances outlive a restart of the control plane and are reconciled when it comes back.
    stop_instances_on_exit: bool = False
    # The ranges a function's aube.toml must stay in (`aube.controlplane.bounds`): `<key>_min` / `<key>_max` for
    # every limit and scaling value. `cpus_max` None = the host's cores; a stream timeout's max None = no maximum
    # (and then its 0, "never", is allowed).
    memory_min: str = "6m"
    memory_max: str = "4g"
    cpus_min: float = 0.01
    cpus_max: float | None = None
    pids_min: int = 8
    pids_max: int = 4096
    min_free_min: int = 0
    min_free_max: int = 10
    max_instances_min: int = 1
    max_instances_max: int = 100
    idle_timeout_min: float = 1.0
    idle_timeout_max: float = 86400.0
    stream_idle_timeout_min: float = 0.0
    stream_idle_timeout_max: float | None = None
    stream_max_duration_min: float = 0.0
    stream_max_duration_max: float | None = None
    max_bundle_depth: int = 32  # path components of any member of an upload bundle
    max_parallel_uploads: int = 2  # uploads fetched and extracted at once; more wait their turn
    max_waiting_uploads: int = 8  # beyond this many waiting, an upload is refused at once (capacity_exhausted)
    # Process runtime sandbox: the host uid and gid an instance runs as (when the control plane is root), and
    # where the instances' Unix socket folders live ("" = /run/aube for root, else <data_dir>/run). Not under
    # data_dir by default: a socket path must fit in 107 bytes.
    sandbox_uid: int = 65534
    socket_dir: str = ""
    # Docker: the network instances join (created when missing) and its bridge interface (at most 15 characters),
    # whose host input the runtime closes with iptables. Without a working firewall the runtime refuses to start,
    # unless `instance_firewall` is off: then the operator must close the bridge's input to the host themselves.
    instance_network: str = names.INSTANCE_NETWORK
    instance_bridge: str = names.INSTANCE_BRIDGE
    instance_firewall: bool = True
    # Requests (upload, delete, list) one tenant may have in flight at once on this control plane; more are refused
    # with `too_many_requests`. Without a bound one tenant's flood of uploads (each up to the 8 MB max payload, held
    # while it waits, then a build) is every tenant's outage. The operator's own requests are not counted.
    tenant_max_requests: int = 4
    # Functions one tenant may have (each holds a prepared version on disk, a registry record, usually a warm
    # instance); more new names are refused with `quota_exceeded`. The operator's own functions are not counted.
    tenant_max_functions: int = 50
    # /_aube/metrics (builds, starts, stops, reconcile actions, functions, instances) is served here only; None = not
    # served, 0 = a free port (tests). The host is every service's operator host (AUBE_OPERATOR_HOST); the port has
    # a name of its own, since `aube start` hands one environment to every service.
    operator_host: str = "127.0.0.1"
    controlplane_operator_port: int | None = DEFAULT_CONTROLPLANE_OPERATOR_PORT
    # Instances' output (`aube logs`, docs/contract.md): per instance at most `log_rate` lines a second with bursts of
    # `log_burst` (more are dropped and counted), each line cut at `log_line_bytes`; the platform keeps lines for
    # --since `log_max_age` seconds, `log_max_bytes` in all and `log_max_lines` per function and host.
    log_rate: float = 100.0
    log_burst: int = 200
    log_line_bytes: int = 2048
    log_max_age: float = 3600.0
    log_max_bytes: int = 64 * 1024 * 1024
    log_max_lines: int = 10000
    # The largest file a process-runtime instance may write (RLIMIT_FSIZE): bounds its output files on the host's
    # disk however fast it writes (the reader cuts them as it goes), and every other file it writes.
    # At least 1 MiB: the reader cuts a file it has read past 1 MiB (runtimes/output.py MAX_FILE).
    output_max_file_bytes: Annotated[int, msgspec.Meta(ge=1024 * 1024)] = 8 * 1024 * 1024


class ProxySettings(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str = DEFAULT_NATS_URL  # one server, or several separated by commas
    nats_user: str = ""
    nats_password: str = ""
    # Used when this service is the first to create a bucket; an existing bucket is used at whatever count it has.
    kv_replicas: KvReplicas = 1
    proxy_host: str = "0.0.0.0"
    proxy_port: int = DEFAULT_PROXY_PORT
    proxy_id: str = msgspec.field(default_factory=_default_node_id)
    reuse_port: bool = True
    claim_timeout: float = 10.0
    # While instances of the function are starting, a waiting client waits for them up to this long (proxy/claiming).
    claim_timeout_max: float = 60.0
    lease_ttl: float = 6.0
    max_head_bytes: int = 16 * 1024
    head_timeout: float | None = 10.0
    connect_timeout: float = 3.0
    scale_cooldown: float = 2.0
    # /_aube/metrics is served here only, never on the public port (it names every function). None = not served.
    operator_host: str = "127.0.0.1"
    operator_port: int | None = DEFAULT_OPERATOR_PORT
    # Dead peers on the client leg and on TCP instance legs (`aube.proxy.sockopts`): keepalive probes after
    # `tcp_keepalive_idle` quiet seconds, every `tcp_keepalive_interval`, `tcp_keepalive_count` of them; data or
    # probes unacknowledged for `tcp_user_timeout` end the connection. With these defaults a stream whose peer's
    # host vanished ends about 20 s after the peer was last heard from. None disables keepalive / the user timeout.
    tcp_keepalive_idle: float | None = 10.0
    tcp_keepalive_interval: float = 5.0
    tcp_keepalive_count: int = 3
    tcp_user_timeout: float | None = 20.0
    # After a stream, how long its instance may take to finish the function's handler (the client may leave while
    # it still runs) before it goes back to the pool; an instance still busy then is stopped instead of reused.
    handler_grace: float = 10.0
    # After a stream, its instance stays claimed by this replica this long and goes to the replica's next client of
    # the function with no registry write (proxy/reserve.py); 0 releases it at once.
    reserve_seconds: float = 2.0
    # Free instances of each function this replica claims ahead of demand and holds for its next clients, served with
    # no NATS round trip (proxy/reserve.py); none for `min_free = 0`. 0: none, the default (docs/reservations.md: the
    # dashboard counts busy instances as open streams).
    reserve: Annotated[int, msgspec.Meta(ge=0)] = 0
    # Socket handoff (proxy/handoff.py): "auto" passes a client's own socket to an instance on this host that takes
    # it (the proxy is then out of the data path) and relays otherwise; "off" always relays. A handed-off stream
    # ends at the manifest's ping bound like a relayed one, whichever peer hangs (docs/handoff.md).
    handoff: Literal["auto", "off"] = "auto"
    # How a relayed stream's bytes move once its instance answered (proxy/native_relay.py): "native" on the relay
    # engine's own thread (a compiled module, native/relay), "python" in the event loop's protocols, "auto" native when
    # the module is installed. "native" without the module is a startup error.
    relay_engine: Literal["auto", "native", "python"] = "auto"


def _default_host_id() -> str:
    """The machine's name as a host id (lower-case letters, digits and dashes), else a random one."""
    cleaned = "".join(c if c.isalnum() else "-" for c in socket.gethostname().lower()).strip("-")[:32].strip("-")
    return cleaned or f"host-{uuid.uuid4().hex[:8]}"


class AgentSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The host agent's own settings; the runtime it runs takes the control plane's (`ControlPlaneSettings`: runtime,
    data_dir, publish_host, advertise_host, owner-independent limits), read from the same environment."""

    nats_url: str = DEFAULT_NATS_URL
    nats_user: str = ""
    nats_password: str = ""
    host_id: str = msgspec.field(default_factory=_default_host_id)
    capacity: int = 50  # instances this host takes at most
    kv_replicas: KvReplicas = 1  # used only to create the hosts bucket when missing; the control plane sets the count
    lease_ttl: float = 6.0
    reconcile_interval: float = 10.0


class ReaperSettings(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str = DEFAULT_NATS_URL  # one server, or several separated by commas
    nats_user: str = ""
    nats_password: str = ""
    # Used when this service is the first to create a bucket; an existing bucket is used at whatever count it has.
    kv_replicas: KvReplicas = 1
    reaper_id: str = msgspec.field(default_factory=_default_node_id)
    reap_interval: float = 1.0
    lease_ttl: float = 6.0
    # /_aube/metrics (reaps, deleted leases, passes) is served here only; None = not served, 0 = a free port.
    operator_host: str = "127.0.0.1"
    reaper_operator_port: int | None = DEFAULT_REAPER_OPERATOR_PORT


S = TypeVar("S", bound=msgspec.Struct)

_DISABLED = {"", "none", "off"}


def settings_from_env(kind: type[S], environ: Mapping[str, str] | None = None, **overrides: object) -> S:
    """Build `kind` from `AUBE_<FIELD>` variables (then `overrides`); a bad value names its variable."""
    environ = os.environ if environ is None else environ
    raw: dict[str, object] = {}
    for field in msgspec.structs.fields(kind):
        value = environ.get(f"AUBE_{field.name.upper()}")
        if value is None:
            continue
        raw[field.name] = None if value.strip().lower() in _DISABLED and _nullable(field.type) else value
    raw.update(overrides)
    try:
        return msgspec.convert(raw, kind, strict=False)
    except msgspec.ValidationError as e:
        raise InvalidRequest(f"bad setting: {e} (from AUBE_* environment variables)") from e


def _nullable(tp: object) -> bool:
    return "None" in repr(tp)
