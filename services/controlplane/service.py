"""The control plane process: NATS request handlers around `core.ControlPlane`, plus its housekeeping loops.

Thin by design: decode a request, call the operation, encode the reply. Every failure becomes an error reply with
a code (never a silent timeout), and the service keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import ServiceUnavailableError

from aube.controlplane.bundle import BundleLimits
from aube.controlplane.core import ControlPlane
from aube.controlplane.logship import LogHistory, LogShipper, ensure_log_stream, ship_output
from aube.controlplane.runtimes.base import Runtime
from aube.controlplane.runtimes.local import select_local_runtime
from aube.controlplane.runtimes.output import OutputSource
from aube.controlplane.upkeep import Upkeep
from aube.shared import buckets, names, natsconn, operator_http
from aube.shared import tenants as tenancy
from aube.shared.credentials import redact
from aube.shared.errors import AubeError, InvalidRequest, ServiceUnavailable, TooManyRequests
from aube.shared.redact import Redactor
from aube.shared.registry import Registry
from aube.shared.schemas import (
    DeleteRequest,
    ListRequest,
    LogsRequest,
    ScaleRequest,
    StopInstanceRequest,
    UploadRequest,
    decode,
    encode,
    error_reply,
)
from aube.shared.settings import ControlPlaneSettings

log = logging.getLogger(__name__)

# What a request meets when the registry is between leaders or its server is not current: answered `unavailable`.
REGISTRY_AWAY = (ServiceUnavailableError, NatsTimeoutError, NoRespondersError, TimeoutError)

# How often retirement runs (delete grace, retired versions, lost stop requests); cheap: two KV snapshots.
RETIRE_INTERVAL = 1.0


async def select_runtime(settings: ControlPlaneSettings) -> Runtime:
    """This machine's runtime (runtimes/local.py); with `hosts`, chosen after NATS is reached (`serve`)."""
    return await select_local_runtime(settings)


Handler = Callable[[Any], Awaitable[msgspec.Struct]]
TenantHandler = Callable[[Any, str], Awaitable[msgspec.Struct]]


def _ignoring_tenant(handler: Handler) -> TenantHandler:
    async def call(request: Any, _tenant: str) -> msgspec.Struct:
        return await handler(request)

    return call


async def serve(
    settings: ControlPlaneSettings,
    *,
    runtime: Runtime | None = None,
    task_status: TaskStatus[ControlPlane] = anyio.TASK_STATUS_IGNORED,
) -> None:
    try:
        BundleLimits.from_settings(settings)  # an unusable AUBE_*_MIN/_MAX stops the start before anything runs
    except ValueError as e:
        raise InvalidRequest(f"bad setting: {e}") from e
    on_hosts = runtime is None and settings.runtime == "hosts"
    if runtime is None and not on_hosts:
        runtime = await select_runtime(settings)
    nc = await natsconn.connect(
        settings.nats_url,
        user=settings.nats_user,
        password=settings.nats_password,
        name=f"aube-controlplane-{settings.owner}",
        max_reconnect_attempts=-1,
    )
    cp: ControlPlane | None = None
    try:
        js = nc.jetstream()
        # The control plane sets the buckets' replica count (AUBE_KV_REPLICAS): existing ones are updated in place.
        replicas, resize = settings.kv_replicas, buckets.Resize.EXACT
        registry = await Registry.open(js, replicas=replicas, resize=resize)
        if on_hosts:
            from aube.controlplane.runtimes.hosts import HostsRuntime

            runtime = await HostsRuntime.connect(settings, nc, registry)
        assert runtime is not None
        bundles = await buckets.open_object_store(js, names.BUCKET_BUNDLES, replicas=replicas, resize=resize)
        await ensure_log_stream(js, settings)
        history = LogHistory(js, registry)
        cp = ControlPlane(settings, nc, registry, runtime, bundles)
        await cp.reconcile(startup=True)
        # Deployers' requests arrive on the contract's subjects from the platform account itself, and as
        # `aube.t.<tenant>.fn.*` from each tenant's account (deploy/nats.conf); the handler learns the tenant from the
        # subject. Scale and stop are the services' own and exist in the platform account only.
        tenant_routes: list[tuple[str, type[msgspec.Struct], TenantHandler]] = [
            (names.SUBJECT_UPLOAD, UploadRequest, cp.upload),
            (names.SUBJECT_DELETE, DeleteRequest, cp.delete),
            (names.SUBJECT_LIST, ListRequest, cp.list),
            (names.SUBJECT_LOGS, LogsRequest, history.answer),
        ]
        internal_routes: list[tuple[str, type[msgspec.Struct], Handler]] = [
            (names.SUBJECT_SCALE, ScaleRequest, cp.scale),
            (names.SUBJECT_STOP_INSTANCE, StopInstanceRequest, cp.stop_instance),
        ]
        gate = RequestGate(settings.tenant_max_requests)
        async with anyio.create_task_group() as tg:
            for subject, kind, tenant_handler in tenant_routes:
                for pattern in (subject, tenancy.tenant_subject("*", subject)):
                    sub = await nc.subscribe(pattern, queue=names.QUEUE_CONTROLPLANE)
                    tg.start_soon(_pump, sub, kind, tenant_handler, tg, cp.redactor, gate)
            for subject, kind, handler in internal_routes:
                sub = await nc.subscribe(subject, queue=names.QUEUE_CONTROLPLANE)
                tg.start_soon(_pump, sub, kind, _ignoring_tenant(handler), tg, cp.redactor, None)
            tg.start_soon(_every, settings.reconcile_interval, cp.reconcile, "reconcile")
            tg.start_soon(_every, RETIRE_INTERVAL, cp.retire_pass, "retirement")
            # Exits noticed at once and min_free kept without traffic; reconcile stays the backstop.
            tg.start_soon(Upkeep(cp).run)
            if settings.controlplane_operator_port is not None:
                metrics_port = await tg.start(
                    operator_http.serve,
                    settings.operator_host,
                    settings.controlplane_operator_port,
                    cp.metrics.render,
                    "AUBE_CONTROLPLANE_OPERATOR_PORT",
                )
                log.info("control plane serves /_aube/metrics on %s:%d", settings.operator_host, metrics_port)
            if isinstance(runtime, OutputSource):  # `hosts`: each host's agent ships its instances' output
                shipper = LogShipper(nc, names.LOGS_LOCAL_ORIGIN, settings)
                tg.start_soon(ship_output, runtime, settings.owner, shipper)
            await nc.flush()
            log.info(
                "control plane %s serving on %s with the %s runtime",
                settings.owner,
                redact(settings.nats_url),
                runtime.kind,
            )
            task_status.started(cp)
    finally:
        with anyio.move_on_after(60, shield=True):
            if settings.stop_instances_on_exit and cp is not None:
                await cp.stop_everything()
        with anyio.move_on_after(5, shield=True):
            await nc.drain()
            if runtime is not None:
                await runtime.close()


class RequestGate:
    """How many requests each tenant has in flight; a tenant at `limit` is refused until one of them ends. The
    operator's requests (plain subjects in the platform account) are not counted."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.in_flight: dict[str, int] = {}

    def enter(self, tenant: str) -> bool:
        if tenant == tenancy.OPERATOR:
            return True
        if self.in_flight.get(tenant, 0) >= self.limit:
            return False
        self.in_flight[tenant] = self.in_flight.get(tenant, 0) + 1
        return True

    def leave(self, tenant: str) -> None:
        if tenant == tenancy.OPERATOR:
            return
        left = self.in_flight.pop(tenant, 1) - 1
        if left > 0:
            self.in_flight[tenant] = left


async def _pump(
    sub: Subscription,
    kind: type[msgspec.Struct],
    handler: TenantHandler,
    tg: TaskGroup,
    redactor: Redactor,
    gate: RequestGate | None,
) -> None:
    # Each request runs in its own task: an upload takes seconds to minutes and must not hold up a scale request.
    # A tenant's requests are bounded (`gate`): beyond its limit, refused at once, its message dropped.
    async for msg in sub.messages:
        tenant = tenancy.tenant_of(msg.subject)
        if gate is not None and not gate.enter(tenant):
            busy = TooManyRequests(f"you have {gate.limit} requests in flight already; wait for one to finish")
            tg.start_soon(_refuse, msg, busy)
            continue
        tg.start_soon(_answer, msg, kind, handler, redactor, gate)


async def _refuse(msg: Msg, error: AubeError) -> None:
    log.info("%s refused: %s (%s)", msg.subject, error.message, error.code)
    if msg.reply:
        await msg.respond(error_reply(error))


async def _answer(
    msg: Msg, kind: type[msgspec.Struct], handler: TenantHandler, redactor: Redactor, gate: RequestGate | None
) -> None:
    tenant = tenancy.tenant_of(msg.subject)
    try:
        await _answer_as(msg, kind, handler, redactor, tenant)
    finally:
        if gate is not None:
            gate.leave(tenant)


async def _answer_as(
    msg: Msg, kind: type[msgspec.Struct], handler: TenantHandler, redactor: Redactor, tenant: str
) -> None:
    # Every error reply goes to a deployer: no credential, no host path, bounded (a build's output, an OSError's
    # file name and a cgroup path all end up in messages). The operator's log keeps the paths.
    try:
        reply = encode(await handler(decode(msg.data, kind), tenant))
    except AubeError as e:
        log.info("%s refused: %s (%s)", msg.subject, redactor.for_log(e.message), e.code)
        reply = error_reply(AubeError(redactor.for_deployer(e.message), code=e.code))
    except Exception as e:
        away = _registry_away(e)
        if away is None:
            log.exception("%s failed", msg.subject)
            reply = error_reply(AubeError(redactor.for_deployer(f"internal error: {type(e).__name__}: {e}")))
        else:
            # A registry between leaders (or a server catching up after a partition) is not a bug: the caller
            # retries.
            log.warning("%s failed, the registry did not answer: %s", msg.subject, away)
            message = f"the platform's registry did not answer ({type(away).__name__}); retry shortly"
            reply = error_reply(ServiceUnavailable(message))
    if msg.reply:  # published without a reply subject (`nats pub`): the work is done all the same
        await msg.respond(reply)


def _registry_away(e: BaseException) -> BaseException | None:
    """The registry error `e` is, or the first of a group made only of such errors (work done side by side in a
    task group fails as a group); None for anything else."""
    if isinstance(e, REGISTRY_AWAY):
        return e
    if isinstance(e, BaseExceptionGroup):
        leaves = [_registry_away(inner) for inner in e.exceptions]
        if leaves and all(leaf is not None for leaf in leaves):
            return leaves[0]
    return None


async def _every(interval: float, job: Callable[[], Awaitable[object]], what: str) -> None:
    while True:
        await anyio.sleep(interval)
        try:
            await job()
        except Exception:
            # A pass that failed (NATS reconnecting, the engine busy) is retried on the next tick.
            log.warning("%s pass failed", what, exc_info=True)
