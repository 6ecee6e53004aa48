"""`aube logs`: instances' output shipped over NATS into their function's tenant's account, kept for --since.

Who ships: whatever owns the instance on its host, from what its runtime read of the instance's stdout and stderr
(runtimes/output.py): the control plane for its own runtime (origin `_local`), each host's agent for the instances
on its host (origin = its host id, the only origin its NATS user may publish). A line is published in the platform
account on `aube.t.<tenant>.logs.fn.<name>.<origin>` (the function's tenant, as the platform recorded it when the
instance started; plain `aube.logs.fn.<name>.<origin>` for the operator's functions), which nats-server delivers
into that tenant's account only, as `aube.logs.fn.<name>.<origin>` (deploy/nats.conf: exports and imports, like
events). Nothing the instance can do reaches NATS: it writes bytes, the platform reads and tags them.

Bounds, per instance: the runtime's reader lets through at most what RateLimit would (OutputGate, in its thread:
a flood of lines is counted there, not cut into lines on the event loop) and reports the rest to `dropped`;
LineSplitter cuts every line at `log_line_bytes`; RateLimit admits `log_rate` lines a second
(bursts of `log_burst`); what it drops is counted and shipped as one line "N lines dropped" (`dropped` = N) once a
line may go again, or within a second. Lines wait for NATS in a queue of QUEUE_LINES; a line that finds it full is
dropped and counted the same way.

Keeping lines for --since: the JetStream stream STREAM_LOGS in the platform account captures every log subject,
with limits on age, bytes and lines per subject (one subject per function and origin). The control plane answers
`aube.fn.logs` (imported by each tenant like upload and list) from it: a tenant names a function, the control plane
checks the function is that tenant's, and reads only the subjects of the function's tenant. Why a stream and not a
ring in each shipper: lines from every host are in one place that outlives a shipper's restart, the server enforces
the limits, and the hosts' agents need nothing but a publish permission (no request to answer, no JetStream API).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import anyio
from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from aube.controlplane.outputlimits import LineSplitter, RateLimit, dropped_message
from aube.controlplane.runtimes.output import STREAMS, OutputOf, OutputSource
from aube.shared import names
from aube.shared import tenants as tenancy
from aube.shared.errors import InvalidName, InvalidRequest, UnknownFunction
from aube.shared.registry import Registry
from aube.shared.schemas import LogLine, LogsReply, LogsRequest, OutputStream, decode, encode
from aube.shared.settings import ControlPlaneSettings

log = logging.getLogger(__name__)

QUEUE_LINES = 10_000  # lines waiting for NATS, all instances together
REPORT_EVERY = 1.0  # seconds: how soon a count of dropped lines goes out when no line follows
MAX_REPLY_BYTES = 4 * 1024 * 1024  # a history reply stays well under the 8 MB max payload
MAX_REPLY_LINES = 10_000


def log_subject(tenant: str, function: str, origin: str) -> str:
    """Where a line of `tenant`'s function is published in the platform account."""
    subject = names.logs_subject(function, origin)
    return tenancy.tenant_subject(tenant, subject) if tenant != tenancy.OPERATOR else subject


@dataclass
class _Instance:
    of: OutputOf
    subject: str
    limit: RateLimit
    splitters: dict[OutputStream, LineSplitter]
    seq: int = 0


@dataclass
class LogShipper:
    """The runtime's OutputSink: lines cut, bounded and published (see the module docstring)."""

    nc: NATS
    origin: str  # names.LOGS_LOCAL_ORIGIN, or the host id of the agent shipping
    settings: ControlPlaneSettings
    instances: dict[str, _Instance] = field(default_factory=dict)
    dropped_total: int = 0  # every line dropped since the start
    refused: set[str] = field(default_factory=set)  # instances whose output is not shipped (logged once)

    def __post_init__(self) -> None:
        self._send, self._receive = anyio.create_memory_object_stream[tuple[str, bytes]](QUEUE_LINES)

    # OutputSink ---------------------------------------------------------------------------------------------

    def write(self, of: OutputOf, stream: OutputStream, data: bytes) -> None:
        instance = self._instance(of)
        if instance is None:
            return
        now = time.time()
        for text, cut in instance.splitters[stream].feed(data):
            self._line(instance, stream, text, cut, now)

    def dropped(self, of: OutputOf, lines: int) -> None:
        instance = self._instance(of)
        if instance is None:
            return
        instance.limit.dropped += lines
        instance.limit.dropped_total += lines
        self.dropped_total += lines

    def closed(self, of: OutputOf) -> None:
        self.refused.discard(of.instance_id)
        instance = self.instances.pop(of.instance_id, None)
        if instance is None:
            return
        now = time.time()
        for stream in STREAMS:
            for text, cut in instance.splitters[stream].flush():
                self._line(instance, stream, text, cut, now)
        self._report(instance, now)

    # Shipping -----------------------------------------------------------------------------------------------

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._report_loop)
            async with self._receive:
                async for subject, body in self._receive:
                    try:
                        await self.nc.publish(subject, body)
                    except Exception:  # a line is advisory: NATS away must not stop the shipping of later ones
                        log.debug("could not publish a log line on %s", subject, exc_info=True)

    async def _report_loop(self) -> None:
        while True:
            await anyio.sleep(REPORT_EVERY)
            now = time.time()
            for instance in list(self.instances.values()):
                self._report(instance, now)

    def _instance(self, of: OutputOf) -> _Instance | None:
        instance = self.instances.get(of.instance_id)
        if instance is not None or of.instance_id in self.refused:
            return instance
        # Labels and meta files are the platform's, but a subject is built from them: check them all the same.
        try:
            names.validate_name(of.function)
            if of.tenant != tenancy.OPERATOR:
                tenancy.validate_tenant(of.tenant)
        except (InvalidName, InvalidRequest):
            log.warning("output of instance %s is not shipped: its function or tenant is malformed", of.instance_id)
            self.refused.add(of.instance_id)
            return None
        s = self.settings
        instance = _Instance(
            of=of,
            subject=log_subject(of.tenant, of.function, self.origin),
            limit=RateLimit(rate=s.log_rate, burst=s.log_burst),
            splitters={stream: LineSplitter(max_bytes=s.log_line_bytes) for stream in STREAMS},
        )
        self.instances[of.instance_id] = instance
        return instance

    def _line(self, instance: _Instance, stream: OutputStream, text: str, cut: int, now: float) -> None:
        if not instance.limit.admit(now):
            self.dropped_total += 1
            return
        self._report(instance, now)
        self._emit(instance, stream, text, now, truncated=cut)

    def _report(self, instance: _Instance, now: float) -> None:
        dropped = instance.limit.take_dropped()
        if dropped:
            self._emit(instance, "stderr", dropped_message(dropped), now, dropped=dropped)

    def _emit(
        self, instance: _Instance, stream: OutputStream, text: str, now: float, *, truncated: int = 0, dropped: int = 0
    ) -> None:
        instance.seq += 1
        line = LogLine(
            function=instance.of.function,
            instance=instance.of.instance_id,
            stream=stream,
            at=now,
            line=text,
            seq=instance.seq,
            truncated=truncated,
            dropped=dropped,
        )
        try:
            self._send.send_nowait((instance.subject, encode(line)))
        except anyio.WouldBlock:  # NATS slower than the instances: counted like a rate-limited line
            instance.limit.dropped += 1
            self.dropped_total += 1
        except anyio.ClosedResourceError:  # shipping ended (the service stopping): nothing reads it any more
            pass

    def close(self) -> None:
        """Close the line queue's two ends (a queue left open is a ResourceWarning once collected)."""
        self._send.close()
        self._receive.close()


async def ship_output(source: OutputSource, owner: str, shipper: LogShipper) -> None:
    """Run `shipper` on what `source`'s instances of `owner` write, until cancelled; a watch that fails (the engine
    restarting) is opened again."""
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(shipper.run)
            while True:
                try:
                    await source.watch_output(owner, shipper)
                except Exception:
                    log.warning("reading instances' output failed; again in %gs", REPORT_EVERY, exc_info=True)
                await anyio.sleep(REPORT_EVERY)
    finally:
        shipper.close()


# ---------------------------------------------------------------------------------------------------------------
# Keeping and serving lines (the control plane)


async def ensure_log_stream(js: JetStreamContext, settings: ControlPlaneSettings) -> None:
    """STREAM_LOGS with the settings' limits, created or brought up to them."""
    config = StreamConfig(
        name=names.STREAM_LOGS,
        subjects=[f"{names.SUBJECT_LOGS_PREFIX}.>", tenancy.tenant_subject("*", f"{names.SUBJECT_LOGS_PREFIX}.>")],
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=settings.log_max_age,
        max_bytes=settings.log_max_bytes,
        max_msgs_per_subject=settings.log_max_lines,
        max_msg_size=settings.log_line_bytes * 6 + 1024,  # the JSON of a full line of control bytes (\u0001 each)
        num_replicas=settings.kv_replicas,
    )
    try:
        await js.add_stream(config)
    except BadRequestError:  # exists with other limits (an earlier configuration): take these
        await js.update_stream(config)


class LogHistory:
    """Answers `aube.fn.logs`: a function's kept lines, for its own tenant (or the operator) only."""

    def __init__(self, js: JetStreamContext, registry: Registry) -> None:
        self.js = js
        self.registry = registry

    async def answer(self, req: LogsRequest, tenant: str) -> LogsReply:
        name = names.validate_name(req.name)
        entry = await self.registry.get_function(name)
        if entry is None or not tenancy.may_touch(tenant, entry.record.tenant):
            raise UnknownFunction(f"no function named {name!r}")  # another tenant's is not even acknowledged
        limit = max(1, min(req.limit, MAX_REPLY_LINES))
        # The function's tenant's subjects: what its instances shipped, whoever asks (its tenant or the operator).
        subject = log_subject(entry.record.tenant, name, "*")
        lines, more = await self._read(subject, req.since, limit)
        return LogsReply(name=name, lines=lines, more=more)

    async def _read(self, subject: str, since: float | None, limit: int) -> tuple[list[LogLine], bool]:
        config = ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL if since is None else DeliverPolicy.BY_START_TIME,
            opt_start_time=None if since is None else datetime.fromtimestamp(since, UTC),
            inactive_threshold=30.0,
            mem_storage=True,
        )
        sub = await self.js.pull_subscribe(subject, stream=names.STREAM_LOGS, config=config)
        kept: collections.deque[LogLine] = collections.deque(maxlen=limit)
        seen = 0
        try:
            pending = (await sub.consumer_info()).num_pending
            while pending:
                try:
                    batch = await sub.fetch(batch=min(pending, 1000), timeout=2.0)
                except NatsTimeoutError:
                    break
                for msg in batch:
                    pending = msg.metadata.num_pending
                    seen += 1
                    with contextlib.suppress(InvalidRequest):
                        kept.append(decode(msg.data, LogLine))
        finally:
            with contextlib.suppress(Exception):
                info = await sub.consumer_info()
                await sub.unsubscribe()
                await self.js.delete_consumer(names.STREAM_LOGS, info.name)
        lines = list(kept)
        size = 0
        for first in range(len(lines) - 1, -1, -1):  # the newest that fit the reply
            size += len(lines[first].line) + 200
            if size > MAX_REPLY_BYTES:
                lines = lines[first + 1 :]
                break
        return lines, seen > len(lines)
