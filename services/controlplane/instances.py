"""The life of one function's instances, as the control plane drives it: start and health-check, mark free,
drain and stop, retire an old version's; and the two requests about instances (scale, stop-instance).

Its own module because uploads, deletes and housekeeping all start or stop instances: each transition is written
once, here, by compare-and-set through `Registry.apply` (shared/instance_lifecycle.py says which transitions are
allowed), so a concurrent proxy, reaper or second control plane wins over a stale decision.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from functools import partial

import anyio

from aube.controlplane import decisions
from aube.controlplane.context import CLEANUP_SECONDS, Context
from aube.controlplane.health import wait_healthy
from aube.controlplane.runtimes.base import InstanceSpec, StartedInstance
from aube.shared import addresses, names
from aube.shared import instance_lifecycle as lifecycle
from aube.shared import tenants as tenancy
from aube.shared.errors import AubeError, CapacityExhausted, InvalidRequest, UnknownFunction
from aube.shared.registry import InstanceEntry, Written
from aube.shared.schemas import (
    FunctionRecord,
    InstanceAddress,
    InstanceRecord,
    Manifest,
    ScaleReply,
    ScaleRequest,
    StopInstanceReply,
    StopInstanceRequest,
)

log = logging.getLogger(__name__)


class Instances:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def start_instances(
        self,
        name: str,
        version: int,
        artifact: str,
        manifest: Manifest,
        count: int,
        *,
        tenant: str,
        claimable: bool = False,
    ) -> list[InstanceEntry]:
        """Start up to `count` instances concurrently, each in a slot it won by compare-and-set, and health-check
        them. With `claimable`, each becomes "free" the moment it is healthy (a scale-out: waiting clients should
        not wait for the slowest sibling); otherwise they stay "starting" until the caller marks them free. Fewer
        than `count` come back when slots run out; if every start fails, the first failure is raised."""
        taken = {e.record.slot for e in await self.ctx.registry.instances(name)}
        results: list[InstanceEntry] = []
        errors: list[AubeError] = []

        async def start_one() -> None:
            try:
                entry = await self._start_instance(name, version, artifact, manifest, taken, claimable, tenant)
            except AubeError as e:
                errors.append(e)
                return
            if entry is not None:
                results.append(entry)

        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(start_one)
        if not results and errors:
            raise errors[0]
        return sorted(results, key=lambda e: e.record.slot)

    async def start_warm(self, fn: FunctionRecord, count: int) -> list[InstanceEntry]:
        """Start up to `count` claimable instances of the function's current version (the min_free keeper)."""
        return await self.start_instances(
            fn.name, fn.version, fn.artifact, fn.manifest, count, tenant=fn.tenant, claimable=True
        )

    async def _start_instance(
        self,
        name: str,
        version: int,
        artifact: str,
        manifest: Manifest,
        taken: set[int],
        claimable: bool,
        tenant: str,
    ) -> InstanceEntry | None:
        now = time.time()
        instance_id = uuid.uuid4().hex[:12]
        # The instance credential: only the proxies and this service present it (docs/security.md).
        secret = secrets.token_urlsafe(32)
        record: InstanceRecord | None = None
        revision: int | None = None
        for slot in decisions.free_slots(taken, manifest.scaling.max_instances):
            taken.add(slot)  # a sibling task of this request does not try it again
            record = InstanceRecord(
                function=name,
                slot=slot,
                instance_id=instance_id,
                version=version,
                state="starting",
                runtime=self.ctx.runtime.kind,
                owner=self.ctx.owner,
                created_at=now,
                secret=secret,
            )
            revision = await self.ctx.registry.create_instance(record)
            if revision is not None:
                break
        if record is None or revision is None:
            return None
        spec = InstanceSpec(
            function=name,
            version=version,
            slot=record.slot,
            instance_id=instance_id,
            artifact=artifact,
            manifest=manifest,
            owner=self.ctx.owner,
            secret=secret,
            tenant=tenant,
        )
        key = names.instance_key(name, record.slot)
        self.ctx.in_flight.add(instance_id)
        self.ctx.in_flight_during_pass.add(instance_id)
        started: StartedInstance | None = None
        began = time.monotonic()
        try:
            started = await self.ctx.runtime.start(spec)
            handle = started.handle
            await wait_healthy(
                started.address,
                instance_id,
                self.ctx.settings.health_timeout,
                lambda: self.ctx.runtime.is_alive(handle),
                secret,
            )
            address, handle, host, handoff = started.address, started.handle, started.host, started.handoff

            def healthy(rec: InstanceRecord) -> InstanceRecord:
                rec = lifecycle.started(rec, address, handle, host=host, instance_id=instance_id, handoff=handoff)
                return lifecycle.mark_free(rec, time.time()) if claimable else rec

            outcome = await self.ctx.registry.apply(key, healthy, entry=InstanceEntry(key, revision, record))
            if not isinstance(outcome, Written):
                raise AubeError(f"instance slot {key} was taken over while starting", code="conflict")
            log.info("instance %s of %s v%d healthy at %s", instance_id, name, version, started.address)
            self.ctx.metrics.started(self.ctx.runtime.kind, time.monotonic() - began)
            return outcome.entry
        except BaseException as e:
            if isinstance(e, Exception):  # a cancellation (shutdown, a client gone) is no failed start
                self.ctx.metrics.start_failed(self.ctx.runtime.kind)
            with anyio.move_on_after(CLEANUP_SECONDS, shield=True):
                if started is not None:
                    await self.ctx.runtime.stop(started.handle)
                # Only our own entry: once a delete retired this slot, another upload (another tenant's, when
                # the name was taken over during its delete) may have started its instance in it.
                await self.ctx.registry.delete_instance(key, revision)
            raise
        finally:
            self.ctx.in_flight.discard(instance_id)

    async def mark_free(self, entry: InstanceEntry) -> bool:
        mark_free = partial(lifecycle.mark_free, now=time.time(), instance_id=entry.record.instance_id)
        return isinstance(await self.ctx.registry.apply(entry.key, mark_free, entry=entry), Written)

    async def stop_entry(self, entry: InstanceEntry, *, reason: str) -> None:
        """Stop an instance and drop its entry. Callers have ensured no stream uses it (or its grace is over)."""
        r = entry.record
        if r.handle:
            await self.ctx.runtime.stop(r.handle)
        else:
            # Started by a process that died before recording the handle: find it by its labels.
            for running in await self.ctx.runtime.instances(self.ctx.owner):
                if running.instance_id == r.instance_id:
                    await self.ctx.runtime.stop(running.handle)
        await self.ctx.registry.delete_instance(entry.key, entry.revision)
        self.ctx.metrics.stopped(reason)
        log.info("instance %s of %s v%d stopped: %s", r.instance_id, r.function, r.version, reason)

    async def drain_and_stop(self, entry: InstanceEntry, *, reason: str, busy_ok: bool = False) -> bool:
        """-> draining by compare-and-set, then stop. False if a proxy claimed it meanwhile (or it is gone). An entry
        already draining is stopped as it is: whoever drained it asked for this stop."""
        if entry.record.state == "draining":
            await self.stop_entry(entry, reason=reason)
            return True
        drain = partial(lifecycle.drain, busy_ok=busy_ok, instance_id=entry.record.instance_id)
        outcome = await self.ctx.registry.apply(entry.key, drain, entry=entry)
        if not isinstance(outcome, Written):
            return False
        await self.stop_entry(outcome.entry, reason=reason)
        return True

    async def retire_old_versions(self, name: str, *, current: int | None, deadline: float | None) -> tuple[int, int]:
        """Retire every instance of `name` older than `current` (all of them when None): free ones stop now, busy
        ones finish their stream (until `deadline`, if any). Returns (stopped, still streaming)."""
        stopped = streaming = 0
        for entry in await self.ctx.registry.instances(name):
            if current is None or entry.record.version < current:
                outcome = await self._retire(entry, deadline)
                stopped += outcome == "stopped"
                streaming += outcome == "streaming"
        return stopped, streaming

    async def _retire(self, entry: InstanceEntry, deadline: float | None) -> str:
        """Stop the instance, or mark it to stop once its stream ends. A proxy may claim or release it between our
        read and our write; `Registry.apply` re-reads and decides again."""
        instance_id = entry.record.instance_id
        for _ in range(5):
            if entry.record.state != "busy":
                if await self.drain_and_stop(entry, reason="retired"):
                    return "stopped"
            else:
                retire = partial(lifecycle.retire, deadline=deadline, instance_id=instance_id)
                outcome = await self.ctx.registry.apply(entry.key, retire, entry=entry, attempts=1)
                if isinstance(outcome, Written):
                    return "streaming"
            got = await self.ctx.registry.get_instance(entry.key)
            if got is None or got.record.instance_id != instance_id:
                return "gone"
            entry = got
        # Still changing under us: retirement (retire_pass) finishes the job on its next round.
        return "streaming"

    # -- requests from proxies and reapers ---------------------------------------------------------------------

    async def scale(self, req: ScaleRequest) -> ScaleReply:
        name = names.validate_name(req.name)
        function = await self.ctx.registry.get_function(name)
        if function is None or function.record.deleting:
            raise UnknownFunction(f"no function named {name!r}")
        f = function.record
        count = max(1, min(req.count, f.manifest.scaling.max_instances))
        self.ctx.scaling.add(name)
        try:
            ready = await self.start_instances(
                name, f.version, f.artifact, f.manifest, count, tenant=f.tenant, claimable=True
            )
        finally:
            self.ctx.scaling.discard(name)
        if not ready:
            raise CapacityExhausted(f"{name} already runs its maximum of {f.manifest.scaling.max_instances} instances")
        total = len(await self.ctx.registry.instances(name))
        await self.ctx.events.emit(name, "scaled", tenant=f.tenant, version=f.version, instances=total)
        return ScaleReply(
            name=name,
            started=[
                InstanceAddress(
                    slot=e.record.slot, instance_id=e.record.instance_id, address=addresses.public(e.record.address)
                )
                for e in ready
            ],
            total=total,
        )

    async def stop_instance(self, req: StopInstanceRequest) -> StopInstanceReply:
        name = names.validate_name(req.name)
        entry = await self.ctx.registry.get_instance(names.instance_key(name, req.slot))
        if entry is None or entry.record.instance_id != req.instance_id:
            return StopInstanceReply(stopped=False)  # already gone: stopping is idempotent
        if entry.record.state == "busy":
            raise InvalidRequest(f"instance {req.instance_id} of {name} is carrying a stream; drain it first")
        if entry.record.state == "starting":
            raise InvalidRequest(f"instance {req.instance_id} of {name} is still starting")
        stopped = await self.drain_and_stop(entry, reason=req.reason or "requested")
        if not stopped:
            raise InvalidRequest(f"instance {req.instance_id} of {name} was claimed meanwhile; not stopped")
        function = await self.ctx.registry.get_function(name)
        tenant = tenancy.OPERATOR
        # An instance started before the current function record was created belongs to an earlier owner of the
        # name (taken over during its delete): the current owner hears nothing of it.
        if function is not None and entry.record.created_at >= function.record.created_at:
            tenant = function.record.tenant
        await self.ctx.events.emit(name, "stopped", tenant=tenant, message=f"instance {req.instance_id}: {req.reason}")
        return StopInstanceReply(stopped=True)
