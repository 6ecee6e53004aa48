"""Every wire message and registry record, as msgspec Structs, with their encoders and decoders.

Schema evolution: a new field always gets a default, so services of mixed versions keep decoding each other.
Replies follow the contract: `{"ok": true, ...}` or `{"ok": false, "error": {"code", "message"}}`; since `ok` is
a bool (not a msgspec tag), `decode_reply` reads it first and then decodes the right Struct.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import msgspec

from aube.shared.errors import AubeError, InvalidRequest, error_from_code

# ---------------------------------------------------------------------------------------------------------
# The function manifest (aube.toml). Every key has a default, so AubeFaaS folders need no manifest.


class FunctionSection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    runtime: Literal["python", "command"] = "python"
    # runtime "command": argv of an executable inside the function folder or on PATH.
    command: list[str] = msgspec.field(default_factory=list)
    # runtime "command": "lines" maps text messages to stdin lines; "binary" passes raw bytes both ways.
    mode: Literal["lines", "binary"] = "lines"


class ScalingSection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    min_free: int = 1
    max_instances: int = 10
    idle_timeout: float = 900.0
    fresh_per_stream: bool = False


class LimitsSection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    memory: str = "256m"
    cpus: float = 0.5
    pids: int = 128
    stream_idle_timeout: float = 0.0  # 0 = never
    stream_max_duration: float = 0.0  # 0 = unlimited
    # The ping policy: the instance pings the client every `ping_interval` seconds and ends the stream when a pong
    # takes longer than `ping_timeout`; the proxy ends it when the instance sent nothing for both together (it
    # hangs). 0 = no pings. Pings are traffic: they keep a stream from ever reaching a longer stream_idle_timeout.
    ping_interval: float = 0.0
    ping_timeout: float = 10.0
    # The largest message (after reassembly) the instance accepts from a client; a larger one ends the stream with
    # 1009 (message too big). websockets' own default, 1 MiB, was the hidden limit before it could be set.
    max_message: str = "1m"


class AccessSection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # SHA-256 (hex) of the bearer tokens that may open a stream; empty = a public function. Only hashes travel in
    # the bundle and the registry, never the tokens.
    tokens_sha256: list[str] = msgspec.field(default_factory=list)


class Manifest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    function: FunctionSection = msgspec.field(default_factory=FunctionSection)
    scaling: ScalingSection = msgspec.field(default_factory=ScalingSection)
    limits: LimitsSection = msgspec.field(default_factory=LimitsSection)
    env: dict[str, str] = msgspec.field(default_factory=dict)
    access: AccessSection = msgspec.field(default_factory=AccessSection)


# ---------------------------------------------------------------------------------------------------------
# Registry records (JetStream KV values).

InstanceState = Literal["starting", "free", "busy", "draining", "unhealthy"]
RuntimeKind = Literal["docker", "process"]


class FunctionRecord(msgspec.Struct, frozen=True, kw_only=True):
    """Key `<name>` in BUCKET_FUNCTIONS: the function's current version; proxies read it to route."""

    name: str
    version: int
    manifest: Manifest
    artifact: str  # image tag (docker) or prepared folder (process)
    runtime: RuntimeKind
    created_at: float
    updated_at: float
    deleting: bool = False
    # The tenant that first deployed it: only that tenant re-uploads, deletes, lists or follows it. "" = the
    # operator's (deployed on the platform account's plain subjects); records of earlier versions belonged to the
    # single default tenant.
    tenant: str = "deployer"


class InstanceRecord(msgspec.Struct, frozen=True, kw_only=True):
    """Key `<function>.<slot>` in BUCKET_INSTANCES.

    A function has at most `max_instances` slots, and a slot key is created with `kv.create` (absent only),
    so the cap holds for any number of concurrent scale requests. Every state change is a compare-and-set
    on the entry's revision: that is what makes a claim exclusive across proxy replicas.
    """

    function: str
    slot: int
    instance_id: str
    version: int
    state: InstanceState
    runtime: RuntimeKind
    owner: str  # the control plane that started it (its reconcile scope)
    address: str = ""  # "host:port" a proxy dials; empty while starting
    handle: str = ""  # container id or process id
    created_at: float = 0.0
    last_used: float = 0.0  # when it last became free
    claimed_by: str | None = None  # proxy id holding the stream
    claimed_at: float | None = None
    streams_served: int = 0
    retire: bool = False  # set by delete/re-upload: stop it once its stream ends instead of reusing it
    retire_deadline: float | None = None  # delete's grace: a stream still open then is ended; None = never
    # The instance credential the proxy and the health probe present (see docs/security.md). Only platform services
    # read the registry; never logged, never in a reply or an event. Empty for instances started before it existed.
    secret: str = ""
    # The host agent running it (services/agent), when the control plane places instances on hosts; "" = the control
    # plane's own runtime (a single machine). A host whose lease expires takes its instances with it (the reaper).
    host: str = ""
    # The claimant handed the client's own socket to the instance (aube.instance.handoff): the stream lives in the
    # instance, not in the proxy, so the reaper leaves the claim alone even once the proxy is dead (until
    # `handed_off_until`); the instance exits after such a stream unless its proxy acknowledged the end (and so
    # settled the claim). Cleared, with the next field, whenever the claim goes; a claim kept for the proxy's next
    # client stays flagged while its instance holds the kept control connection (it exits should the proxy die), and
    # is cleared by one write (`keep_claim`) for an instance that cannot.
    handed_off: bool = False
    # When the stream's longest duration ends (the claimant's wall clock: the handoff plus the limit it passed to the
    # instance): past it, the reaper cuts a dead proxy's handed-off stream. None: no longest duration, not handed
    # off, or flagged by an older proxy.
    handed_off_until: float | None = None
    # Host path of the instance's handoff socket when it is not beside its Unix address (a Docker instance's
    # bind-mounted folder, controlplane/runtimes/handoffdir.py); "" = that, or none. A host path: never in a reply.
    handoff: str = ""


class ProxyLease(msgspec.Struct, frozen=True, kw_only=True):
    """Key `<proxy id>` in BUCKET_LEASES, renewed by its proxy every ttl/3 seconds.

    A lease whose `renewed_at + ttl` has passed belongs to a dead proxy: the reaper deletes it (compare-and-set)
    and recycles the instances that proxy had claimed, since their stream state is unknown.
    """

    proxy_id: str
    started_at: float
    renewed_at: float
    ttl: float = 6.0
    address: str = ""


class ScaleIntent(msgspec.Struct, frozen=True, kw_only=True):
    """Key `<function>` in BUCKET_SCALE_INTENTS: proxy `proxy_id` asked the control plane to scale `function` at
    `asked_at`, and no other replica asks before `expires_at` (asked_at + the asker's scale cooldown; seconds since
    the epoch, on the asker's clock).

    One replica wins each window: an intent is created absent-only, and one no longer in force is taken over by
    compare-and-set on its revision (Registry.take_scale_intent), so a crashed asker blocks nobody past its window.
    An absolute `expires_at` rather than a ttl: whoever reads the intent judges it without knowing the asker's
    cooldown. The bucket's max_age (names.SCALE_INTENT_MAX_AGE) removes intents nobody takes over, and bounds how
    long a writer with a clock far ahead can hold a window.
    """

    function: str
    proxy_id: str
    asked_at: float
    expires_at: float

    def in_force(self, now: float) -> bool:
        """Whether the window is still held at `now` (so a replica asking at `now` stands back)."""
        return now < self.expires_at


class HostLease(msgspec.Struct, frozen=True, kw_only=True):
    """Key `<host id>` in BUCKET_HOSTS, renewed by the host's agent every ttl/3: the host is alive and can run
    `capacity` instances of the `runtime` kind. Judged like a proxy's lease (reaper/decisions.py); when it dies, its
    instances' entries are recycled and the warm pool is rebuilt on the other hosts."""

    host_id: str
    runtime: RuntimeKind
    capacity: int  # instances this host takes at most
    running: int = 0  # instances it ran at its last renewal
    started_at: float
    renewed_at: float
    ttl: float = 6.0


# ---------------------------------------------------------------------------------------------------------
# Requests.


class UploadRequest(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    zip: str | None = None  # base64 zip: AubeFaaS's body, unchanged
    tar: str | None = None  # base64 tar.gz
    object: str | None = None  # key in the BUCKET_BUNDLES object store


class DeleteRequest(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    grace: float | None = None  # seconds busy instances may keep streaming; None = the configured default


class ListRequest(msgspec.Struct, frozen=True, kw_only=True):
    name: str | None = None


class ScaleRequest(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    count: int = 1
    requested_by: str = ""


class StopInstanceRequest(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    slot: int
    instance_id: str  # guards against stopping a newer instance that reused the slot
    reason: str = ""


# ---------------------------------------------------------------------------------------------------------
# Replies.


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    code: str
    message: str


class ErrorReply(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool = False
    error: ErrorBody


class UploadReply(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool = True
    name: str
    version: int
    url: str
    instances: int = 0


class DeleteReply(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool = True
    name: str = ""
    stopped: int = 0
    draining: int = 0


class FunctionSummary(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    version: int
    instances: int
    free: int
    busy: int
    runtime: str = ""
    min_free: int = 0
    max_instances: int = 0
    url: str = ""


class ListReply(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool = True
    functions: list[FunctionSummary] = msgspec.field(default_factory=list)


class InstanceAddress(msgspec.Struct, frozen=True, kw_only=True):
    slot: int
    instance_id: str
    address: str


class ScaleReply(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool = True
    name: str
    started: list[InstanceAddress] = msgspec.field(default_factory=list)
    total: int = 0  # instances of the function after the scale


class StopInstanceReply(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool = True
    stopped: bool = True


# ---------------------------------------------------------------------------------------------------------
# Events on aube.events.fn.<name>.

EventKind = Literal["accepted", "build", "ready", "failed", "scaled", "stopped", "deleted"]


class FunctionEvent(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    event: EventKind
    at: float
    version: int | None = None
    message: str = ""
    code: str | None = None
    instances: int | None = None


OutputStream = Literal["stdout", "stderr"]


class LogLine(msgspec.Struct, frozen=True, kw_only=True):
    """One line an instance wrote, as read by the platform (never published by the instance): on
    `aube.logs.fn.<name>.<origin>` and in LogsReply. `dropped` > 0 marks the platform's own line counting the lines
    the instance's rate limit dropped since the last one shipped."""

    function: str
    instance: str
    stream: OutputStream
    at: float
    line: str
    seq: int = 0  # per instance and shipper: a follower drops what it already printed from the history
    truncated: int = 0  # bytes cut from the end of an over-long line
    dropped: int = 0


class LogsRequest(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    since: float | None = None  # seconds since the epoch; None: everything still kept
    limit: int = 1000  # the newest `limit` lines


class LogsReply(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool = True
    name: str = ""
    lines: list[LogLine] = msgspec.field(default_factory=list)
    more: bool = False  # older lines matched but were left out (limit, or the reply's size)


# ---------------------------------------------------------------------------------------------------------
# Codecs, built once.

_encoder = msgspec.json.Encoder()
T = TypeVar("T")
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


class _ReplyHead(msgspec.Struct):
    ok: bool = False


_head_decoder = msgspec.json.Decoder(_ReplyHead)
_error_decoder = msgspec.json.Decoder(ErrorReply)


def encode(value: msgspec.Struct) -> bytes:
    return _encoder.encode(value)


def decode(data: bytes, kind: type[T]) -> T:
    """Decode `data` as `kind`; a malformed body raises InvalidRequest naming the problem."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(data)  # type: ignore[no-any-return]
    except msgspec.DecodeError as e:
        raise InvalidRequest(f"malformed {kind.__name__}: {e}") from e


def error_reply(error: AubeError) -> bytes:
    return _encoder.encode(ErrorReply(error=ErrorBody(code=error.code, message=error.message)))


def decode_reply(data: bytes, kind: type[T]) -> T:
    """Decode a service's reply; an error reply is raised as the AubeError it carries."""
    try:
        head = _head_decoder.decode(data)
    except msgspec.DecodeError as e:
        raise AubeError(f"unreadable reply: {data[:200]!r}") from e
    if not head.ok:
        err = _error_decoder.decode(data).error
        raise error_from_code(err.code, err.message)
    return decode(data, kind)


def decode_record(data: bytes, kind: type[T]) -> T:
    """Decode a registry value (no InvalidRequest wrapping: a bad record is a bug, not user input)."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    return decoder.decode(data)  # type: ignore[no-any-return]
