"""The reaper's service shell: every `reap_interval` it snapshots the registry, asks `decisions.plan` what to do
and does it.

Safety comes from the registry, not from this process: an instance is drained by a compare-and-set at the
revision the decision was made on, and only the writer that won that CAS sends the stop request. So a proxy
claiming the instance meanwhile, or a second reaper acting on the same snapshot, turns the drain into a no-op
(logged at DEBUG), and any number of reapers can run at once.

Logging policy: INFO for every reap (function, instance, reason), DEBUG for lost races, WARNING when the
registry or the control plane fails (the pass is retried on the next tick; an instance left draining by a lost stop
request is stopped by its control plane, which owns that recovery).
"""

from __future__ import annotations

import logging
import time
from functools import partial

import anyio
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from aube.reaper.decisions import Action, DeleteHost, DeleteLease, Drain, Forget, Plan, Policy, Seen, Snapshot
from aube.reaper.decisions import plan as make_plan
from aube.reaper.metrics import ReaperMetrics
from aube.shared import bus, names, natsconn, operator_http
from aube.shared import instance_lifecycle as lifecycle
from aube.shared.errors import AubeError
from aube.shared.hostbook import HostBook
from aube.shared.registry import Registry, Written
from aube.shared.schemas import InstanceRecord, StopInstanceReply, StopInstanceRequest
from aube.shared.settings import ReaperSettings

log = logging.getLogger(__name__)

# A stop request is answered once the instance is gone; a container stop can take its engine's full grace.
STOP_TIMEOUT = 30.0
# Actions of one pass run side by side, but not as a flood at the control plane.
MAX_CONCURRENT_ACTIONS = 8
# Passes further apart than this many intervals (plus the slack, for slow snapshots) mean the reaper could not
# watch the registry in between: what it observed before no longer counts.
OUTAGE_GAP_INTERVALS = 3
OUTAGE_GAP_SLACK = 2.0


def policy_for(settings: ReaperSettings) -> Policy:
    return Policy(lease_grace=settings.lease_ttl)


async def serve(settings: ReaperSettings, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """Run the reaper until cancelled; `task_status.started()` once connected and the registry is open."""
    nc = await natsconn.connect(
        settings.nats_url,
        user=settings.nats_user,
        password=settings.nats_password,
        name=f"aube-reaper-{settings.reaper_id}",
        max_reconnect_attempts=-1,
        error_cb=_log_nats_error,
    )
    try:
        # Scale intents are the proxies' business: the reaper's NATS user may not even read them.
        registry = await Registry.open(nc.jetstream(), scale_intents=False, replicas=settings.kv_replicas)
        hosts = await HostBook.open(nc.jetstream(), replicas=settings.kv_replicas)
        reaper = Reaper(nc, registry, policy_for(settings), reaper_id=settings.reaper_id, hosts=hosts)
        async with anyio.create_task_group() as tg:
            tg.start_soon(reaper.run, settings.reap_interval)
            if settings.reaper_operator_port is not None:
                port = await tg.start(
                    operator_http.serve,
                    settings.operator_host,
                    settings.reaper_operator_port,
                    reaper.metrics.render,
                    "AUBE_REAPER_OPERATOR_PORT",
                )
                log.info("reaper %s serves /_aube/metrics on %s:%d", settings.reaper_id, settings.operator_host, port)
            log.info("reaper %s running (every %gs)", settings.reaper_id, settings.reap_interval)
            task_status.started()
    finally:
        with anyio.move_on_after(5, shield=True):
            await nc.close()


class LeasesUnwritable(Exception):
    """A lease bucket has no leader: no holder can renew its lease, so this time cannot count toward its death."""


class Reaper:
    """One reaper's loop and its memory of when it first saw each lease revision (see decisions.dead_leases)."""

    def __init__(
        self, nc: NATS, registry: Registry, policy: Policy, *, reaper_id: str = "", hosts: HostBook | None = None
    ) -> None:
        self.nc = nc
        self.registry = registry
        self.hosts = hosts  # None: a platform without host agents (tests of the proxies' side)
        self.policy = policy
        self.reaper_id = reaper_id
        self.seen: dict[str, Seen] = {}
        self.metrics = ReaperMetrics()  # served on the operator address (serve)
        self._limiter = anyio.CapacityLimiter(MAX_CONCURRENT_ACTIONS)

    async def run(self, interval: float) -> None:
        last_ok: float | None = None
        while True:
            # Observations only count across passes that could all read the registry (decisions.dead_leases): after
            # a failed pass, or a gap no healthy loop has (the reaper or its host was paused), they start again.
            if last_ok is not None and time.monotonic() - last_ok > OUTAGE_GAP_INTERVALS * interval + OUTAGE_GAP_SLACK:
                self.forget_observations("passes too far apart")
            try:
                await self.reap_once()
                last_ok = time.monotonic()
                self.metrics.passes.inc("ok")
            except (NatsError, OSError, TimeoutError, LeasesUnwritable) as e:  # the registry is away
                log.warning("reap pass failed, retrying in %gs: %s", interval, e)
                self.forget_observations("a pass failed")
                self.metrics.passes.inc("failed")
            except Exception:  # a bug; the next pass may still do useful work, so keep serving
                log.exception("reap pass failed")
                self.metrics.passes.inc("failed")
            await anyio.sleep(interval)

    def forget_observations(self, why: str) -> None:
        if self.seen:
            log.info("reaper forgets what it observed (%s): leases are judged afresh", why)
        self.seen = {}

    async def reap_once(self) -> Plan:
        """One pass: snapshot, decide, act; returns the plan (for tests and logs)."""
        await self.leases_writable()
        snapshot = await self.snapshot()
        plan = make_plan(snapshot, self.seen, time.time(), self.policy)
        self.seen = plan.seen
        await self.act(plan.actions)
        return plan

    async def act(self, actions: list[Action]) -> None:
        """Carry out actions side by side; each one handles its own failure, so none cancels its siblings."""
        if actions:
            async with anyio.create_task_group() as tg:
                for action in actions:
                    tg.start_soon(self._act, action)

    async def leases_writable(self) -> None:
        """Raise LeasesUnwritable unless each lease bucket's stream has a leader that answers.

        A pass counts toward a lease's death only if its holder could have renewed it meanwhile. On a cluster the
        buckets can be read (followers answer direct gets) while no leader takes writes: a partitioned leader left
        every lease unrenewable for about 6 s, and a reaper that counted that time judged live hosts dead (their
        entries dropped, their streams ended). A bucket without a leader fails the pass, so observations restart
        once a leader is back (a single server always has one)."""
        streams = [f"KV_{names.BUCKET_LEASES}"] + ([f"KV_{names.BUCKET_HOSTS}"] if self.hosts is not None else [])
        for stream in streams:
            info = await self.registry.js.stream_info(stream)
            if info.cluster is not None and not info.cluster.leader:
                raise LeasesUnwritable(f"{stream} has no leader")

    async def snapshot(self) -> Snapshot:
        # Instances before leases: a claim seen here was made after its proxy's lease was written, so that
        # lease is in the later read; only a claim racing a proxy's very first lease can miss it, and
        # Policy.lease_grace covers that.
        functions = {e.key: e.record for e in await self.registry.functions()}
        instances = await self.registry.instances()
        leases = await self.registry.leases()
        hosts = await self.hosts.leases() if self.hosts is not None else []
        return Snapshot(functions=functions, instances=instances, leases=leases, hosts=hosts)

    async def _act(self, action: Action) -> None:
        async with self._limiter:
            try:
                if isinstance(action, DeleteLease):
                    await self._delete_lease(action)
                elif isinstance(action, Drain):
                    await self._drain(action)
                elif isinstance(action, DeleteHost):
                    await self._delete_host(action)
                elif isinstance(action, Forget):
                    await self._forget(action)
            except (NatsError, OSError) as e:
                log.warning("reaper action %s failed, retrying later: %s", type(action).__name__, e)
            except Exception:
                log.exception("reaper action %s failed", type(action).__name__)

    async def _delete_lease(self, action: DeleteLease) -> None:
        if await self.registry.delete_lease(action.proxy_id, action.revision):
            log.info("deleted expired lease of proxy %s", action.proxy_id)
            self.metrics.leases_deleted.inc("proxy")
        else:
            log.debug("lease of proxy %s was renewed meanwhile; kept", action.proxy_id)

    async def _delete_host(self, action: DeleteHost) -> None:
        assert self.hosts is not None
        if await self.hosts.delete(action.host_id, action.revision):
            log.warning("host %s is dead (its agent's lease expired): its instances are recycled", action.host_id)
            self.metrics.leases_deleted.inc("host")
        else:
            log.debug("lease of host %s was renewed meanwhile; kept", action.host_id)

    async def _forget(self, action: Forget) -> None:
        entry = action.entry
        if await self.registry.delete_instance(entry.key, entry.revision):
            self.metrics.reaps.inc(action.reason)
            _instance_log(entry.record).info(
                "dropped %s instance %s of dead host %s",
                entry.record.function,
                entry.record.instance_id,
                entry.record.host,
            )

    async def _drain(self, action: Drain) -> None:
        entry = action.entry
        drain = partial(lifecycle.drain, busy_ok=action.busy_ok, instance_id=entry.record.instance_id)
        outcome = await self.registry.apply(entry.key, drain, entry=entry, attempts=1)
        rec = entry.record
        ilog = _instance_log(rec)
        if not isinstance(outcome, Written):
            # A proxy claimed it, or another reaper drained it first (or the write's outcome is unknown, and the next
            # pass sees what became of it): either way it is not ours to stop now.
            ilog.debug("drain of %s at revision %d not written (%s): left alone", entry.key, entry.revision, outcome)
            return
        ilog.info("reaping %s instance %s (%s)", rec.function, rec.instance_id, action.reason)
        self.metrics.reaps.inc(action.reason)
        await self._stop(rec, action.reason)

    async def _stop(self, rec: InstanceRecord, reason: str) -> None:
        ilog = _instance_log(rec)
        request = StopInstanceRequest(name=rec.function, slot=rec.slot, instance_id=rec.instance_id, reason=reason)
        try:
            reply = await bus.request(self.nc, names.SUBJECT_STOP_INSTANCE, request, StopInstanceReply, STOP_TIMEOUT)
        except AubeError as e:
            # The entry stays draining: its control plane stops it once it has stayed so too long.
            ilog.warning(
                "stop request for %s instance %s failed (%s); will ask again", rec.function, rec.instance_id, e
            )
            return
        ilog.debug("stop of %s instance %s answered: stopped=%s", rec.function, rec.instance_id, reply.stopped)


def _instance_log(rec: InstanceRecord) -> logging.LoggerAdapter[logging.Logger]:
    return logging.LoggerAdapter(log, {"function": rec.function, "instance": rec.instance_id})


async def _log_nats_error(e: Exception) -> None:
    log.warning("nats: %s", e)
