"""What the operator dashboard shows, decided without I/O: the snapshot of one replica's registry view and counters,
and the small ring of recent activity it keeps.

The snapshot is built from an explicit allow-list of fields into Structs of its own, never by encoding registry
records: an instance record carries its credential (`secret`), a function record its manifest (`env`, which may hold a
deployer's secrets, and the hashes of its bearer tokens), and none of that may reach a page.

Platform-wide figures come from the registry view every replica holds (functions, every instance with its state,
host and version; busy instances are the open streams, since each stream has an exclusive instance). Claims and
rejections are this replica's own counters (the metrics); cold starts are instances the view sees appear.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

import msgspec

from aube.proxy.metrics import Metrics
from aube.shared.schemas import FunctionRecord, InstanceRecord

SAMPLE_INTERVAL = 2.0  # seconds between two samples of the ring
SAMPLE_COUNT = 300  # ten minutes of samples
# Claim results that handed a client an instance (a fresh claim, or one this replica kept after a stream).
CLAIMED_RESULTS = frozenset({"claimed", "reserved"})
STATES = ("starting", "free", "busy", "draining", "unhealthy")
LOCAL_HOST = "(local)"  # the label of instances run by the control plane's own runtime (no host agent)


class FunctionView(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    version: int
    runtime: str
    tenant: str
    protected: bool  # the function needs a bearer token (only that: never the hashes)
    deleting: bool
    min_free: int
    max_instances: int
    states: dict[str, int]  # instances of the function by state
    outdated: int  # instances of an older version (draining after a re-upload)


class InstanceView(msgspec.Struct, frozen=True, kw_only=True):
    function: str
    slot: int
    instance_id: str
    version: int
    state: str
    host: str
    runtime: str
    claimed_by: str | None
    streams_served: int
    age: float  # seconds since the instance was created
    busy_for: float | None  # seconds since its current claim, while busy


class HostView(msgspec.Struct, frozen=True, kw_only=True):
    host: str
    states: dict[str, int]


class Totals(msgspec.Struct, frozen=True, kw_only=True):
    functions: int
    instances: int
    open_streams: int  # platform-wide: busy instances
    states: dict[str, int]


class Series(msgspec.Struct, frozen=True, kw_only=True):
    """Per-sample values, oldest first: `t` the sample's wall-clock time, the others what happened since the one
    before (claims, rejections, cold starts) or what was so at it (open streams)."""

    interval: float
    t: list[float]
    claims: list[int]
    rejections: list[int]
    cold_starts: list[int]
    open_streams: list[int]


class DashboardState(msgspec.Struct, frozen=True, kw_only=True):
    proxy_id: str
    at: float
    totals: Totals
    functions: list[FunctionView]
    instances: list[InstanceView]
    hosts: list[HostView]
    replica_streams: dict[str, int]  # streams this replica relays, by function
    series: Series


class Counters(msgspec.Struct, frozen=True, kw_only=True):
    """This replica's cumulative counters, as the ring differentiates them."""

    claims: int
    rejections: int


def counters(metrics: Metrics) -> Counters:
    claims = sum(n for (_, result), n in metrics.claims_total.items() if result in CLAIMED_RESULTS)
    return Counters(claims=claims, rejections=sum(metrics.handshakes_rejected_total.values()))


class Sample(msgspec.Struct, frozen=True, kw_only=True):
    t: float
    claims: int
    rejections: int
    cold_starts: int
    open_streams: int


class History:
    """The ring of recent samples. Each sample takes the cumulative counters and the instance ids in the view; it
    keeps differences, so a restarted replica (counters from zero) starts a fresh ring rather than a negative one.

    Cold starts are instance ids the view did not hold at the sample before: an instance that starts and is gone
    within one interval is not seen. The first sample only learns what exists (the instances running before this
    replica started are no cold starts of the last minutes)."""

    def __init__(self, capacity: int = SAMPLE_COUNT, interval: float = SAMPLE_INTERVAL) -> None:
        self.interval = interval
        self.samples: deque[Sample] = deque(maxlen=capacity)
        self._last: Counters | None = None
        self._known: set[str] | None = None

    def sample(self, now: float, current: Counters, instance_ids: Iterable[str], open_streams: int) -> Sample:
        ids = set(instance_ids)
        cold = 0 if self._known is None else len(ids - self._known)
        last = self._last or current
        sample = Sample(
            t=now,
            claims=max(0, current.claims - last.claims),
            rejections=max(0, current.rejections - last.rejections),
            cold_starts=cold,
            open_streams=open_streams,
        )
        self._last, self._known = current, ids
        self.samples.append(sample)
        return sample

    def series(self) -> Series:
        s = list(self.samples)
        return Series(
            interval=self.interval,
            t=[x.t for x in s],
            claims=[x.claims for x in s],
            rejections=[x.rejections for x in s],
            cold_starts=[x.cold_starts for x in s],
            open_streams=[x.open_streams for x in s],
        )


def _by_state(records: Iterable[InstanceRecord]) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    for rec in records:
        counts[rec.state] = counts.get(rec.state, 0) + 1
    return counts


def _function_view(fn: FunctionRecord, instances: list[InstanceRecord]) -> FunctionView:
    return FunctionView(
        name=fn.name,
        version=fn.version,
        runtime=fn.runtime,
        tenant=fn.tenant,
        protected=bool(fn.manifest.access.tokens_sha256),
        deleting=fn.deleting,
        min_free=fn.manifest.scaling.min_free,
        max_instances=fn.manifest.scaling.max_instances,
        states=_by_state(instances),
        outdated=sum(1 for rec in instances if rec.version < fn.version),
    )


def _instance_view(rec: InstanceRecord, now: float) -> InstanceView:
    busy_for = now - rec.claimed_at if rec.state == "busy" and rec.claimed_at is not None else None
    return InstanceView(
        function=rec.function,
        slot=rec.slot,
        instance_id=rec.instance_id,
        version=rec.version,
        state=rec.state,
        host=rec.host or LOCAL_HOST,
        runtime=rec.runtime,
        claimed_by=rec.claimed_by,
        streams_served=rec.streams_served,
        age=max(0.0, now - rec.created_at) if rec.created_at else 0.0,
        busy_for=None if busy_for is None else max(0.0, busy_for),
    )


def snapshot(
    *,
    proxy_id: str,
    now: float,
    functions: Mapping[str, FunctionRecord],
    instances: Iterable[InstanceRecord],
    replica_streams: Mapping[str, int],
    history: History,
) -> DashboardState:
    """The dashboard's view at `now` (wall clock, as the records' times are)."""
    records = sorted(instances, key=lambda r: (r.function, r.slot))
    of_function: dict[str, list[InstanceRecord]] = {}
    of_host: dict[str, list[InstanceRecord]] = {}
    for rec in records:
        of_function.setdefault(rec.function, []).append(rec)
        of_host.setdefault(rec.host or LOCAL_HOST, []).append(rec)
    states = _by_state(records)
    return DashboardState(
        proxy_id=proxy_id,
        at=now,
        totals=Totals(functions=len(functions), instances=len(records), open_streams=states["busy"], states=states),
        functions=[_function_view(functions[n], of_function.get(n, [])) for n in sorted(functions)],
        instances=[_instance_view(rec, now) for rec in records],
        hosts=[HostView(host=h, states=_by_state(of_host[h])) for h in sorted(of_host)],
        replica_streams={k: v for k, v in sorted(replica_streams.items()) if v > 0},
        series=history.series(),
    )


_encoder = msgspec.json.Encoder()


def encode(state: DashboardState) -> bytes:
    return _encoder.encode(state)
