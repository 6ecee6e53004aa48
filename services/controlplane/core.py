"""The control plane's operations: upload, delete, list, scale, stop-instance, retirement and reconcile.

Each public coroutine is one request (or one pass of a loop). Decisions come from `decisions.py` and `bundle.py`;
this module performs them against the registry, the runtime and NATS. Every registry write that can race is a
compare-and-set, so a concurrent proxy, reaper or second control plane wins over a stale decision.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.object_store import ObjectStore

from aube.controlplane import decisions
from aube.controlplane.bundle import BundleLimits, decode_base64, validate_bundle
from aube.controlplane.health import wait_healthy
from aube.controlplane.objects import fetch_object
from aube.controlplane.runtimes.base import InstanceSpec, Runtime, StartedInstance
from aube.shared import addresses, names, natsconn
from aube.shared import instance_lifecycle as lifecycle
from aube.shared import tenants as tenancy
from aube.shared.errors import (
    AubeError,
    CapacityExhausted,
    InvalidRequest,
    NameTaken,
    QuotaExceeded,
    UnknownFunction,
)
from aube.shared.redact import MAX_LINE_BYTES, platform_redactor, url_passwords
from aube.shared.registry import FunctionEntry, InstanceEntry, Registry, Written
from aube.shared.schemas import (
    DeleteReply,
    DeleteRequest,
    EventKind,
    FunctionEvent,
    FunctionRecord,
    FunctionSummary,
    InstanceAddress,
    InstanceRecord,
    ListReply,
    ListRequest,
    Manifest,
    ScaleReply,
    ScaleRequest,
    StopInstanceReply,
    StopInstanceRequest,
    UploadReply,
    UploadRequest,
    encode,
)
from aube.shared.settings import ControlPlaneSettings

log = logging.getLogger(__name__)

# Bounded cleanup after a failure or a cancellation: long enough to stop a container, short enough not to hang.
CLEANUP_SECONDS = 30.0
# A draining/unhealthy entry nobody stopped for this long lost its stop request; retirement stops it.
STALE_DRAINING_SECONDS = 10.0
# Build output lines sent as `build` events per build; the rest are counted in one last event.
MAX_BUILD_EVENTS = 500


class ControlPlane:
    def __init__(
        self,
        settings: ControlPlaneSettings,
        nc: NATS,
        registry: Registry,
        runtime: Runtime,
        bundles: ObjectStore,
    ) -> None:
        self.settings = settings
        self.nc = nc
        self.registry = registry
        self.runtime = runtime
        self.bundles = bundles
        self.owner = settings.owner
        try:
            self.limits = BundleLimits.from_settings(settings)
        except ValueError as e:
            raise InvalidRequest(f"bad setting: {e}") from e
        # Where object uploads are read from; the bucket's stream follows nats' naming (objects.STREAM_TEMPLATE).
        self.bundle_bucket = names.BUCKET_BUNDLES
        # Fetching and extracting bundles costs disk, memory and CPU per upload: a few at a time, others wait.
        self._intake = anyio.CapacityLimiter(max(1, settings.max_parallel_uploads))
        self.in_flight: set[str] = set()  # instance ids this process is starting right now
        # Every id that was in flight at any moment of the current reconcile pass (see `reconcile`).
        self._in_flight_during_pass: set[str] = set()
        self.uploading: set[str] = set()  # function names with an upload under way here
        # Function names with a scale request under way here: the min_free keeper leaves them to it (upkeep.py).
        self.scaling: set[str] = set()
        self._function_locks: dict[str, anyio.Lock] = {}
        self._first_seen: dict[tuple[str, int], float] = {}
        self.work_dir = Path(settings.data_dir) / "uploads"
        # Events and error replies reach deployers: everything they carry goes through this.
        own = [settings.nats_password, settings.nats_fetch_password]
        secrets = url_passwords(settings.nats_url) + [p for p in own if p]
        self.redactor = platform_redactor(secrets=secrets, data_dir=settings.data_dir)

    # -- events ------------------------------------------------------------------------------------------------

    async def emit(self, name: str, event: EventKind, *, tenant: str, **fields: object) -> None:
        """Publish an event where only `tenant` (the function's, or the requester's) can follow it; its message is
        redacted and bounded like a reply's."""
        message = fields.get("message")
        if isinstance(message, str):
            if event == "build":
                fields["message"] = self.redactor.for_deployer(message, max_bytes=MAX_LINE_BYTES, max_lines=8)
            else:
                fields["message"] = self.redactor.for_deployer(message)
        body = msgspec.convert({"name": name, "event": event, "at": time.time(), **fields}, FunctionEvent)
        subject = names.events_subject(name)
        if tenant != tenancy.OPERATOR:
            subject = tenancy.tenant_subject(tenant, subject)
        try:
            await self.nc.publish(subject, encode(body))
        except Exception:  # an event is advisory: losing one must not fail the operation it reports
            log.warning("could not publish %s event for %s", event, name, exc_info=True)

    # -- upload ------------------------------------------------------------------------------------------------

    @asynccontextmanager
    async def _function_lock(self, name: str) -> AsyncIterator[None]:
        lock = self._function_locks.setdefault(name, anyio.Lock())
        async with lock:
            self.uploading.add(name)
            try:
                yield
            finally:
                self.uploading.discard(name)

    async def _bundle_source(self, req: UploadRequest, workdir: Path, tenant: str) -> bytes | Path:
        """The upload's archive: bytes for a base64 body (bounded by the NATS payload), a file in `workdir` for
        an object, streamed there in bounded memory (the object is removed from the store either way)."""
        sources = [s for s in (req.zip, req.tar, req.object) if s is not None]
        if len(sources) != 1:
            raise InvalidRequest('an upload carries exactly one of "zip", "tar" (base64) or "object" (a bundle key)')
        if req.object is None:
            return decode_base64(sources[0], self.limits.max_compressed_bytes)
        await anyio.to_thread.run_sync(lambda: workdir.mkdir(parents=True, exist_ok=True))
        path = workdir / "bundle.archive"
        async with self._bundle_jetstream(tenant) as js:
            await fetch_object(js, self.bundle_bucket, req.object, path, self.limits.max_compressed_bytes)
        return path

    @asynccontextmanager
    async def _bundle_jetstream(self, tenant: str) -> AsyncIterator[JetStreamContext]:
        """The JetStream holding a requester's bundles: the tenant's own account's (read as that account's
        `aube-fetch-<tenant>` user), or this account's for the operator (and servers without accounts, where every
        request is the operator's)."""
        if tenant == tenancy.OPERATOR:
            yield self.nc.jetstream()
            return
        if not self.settings.nats_fetch_password:
            # Never this account's store for a tenant: a key it names could be the operator's bundle in flight.
            log.warning("a tenant's object upload is refused: AUBE_NATS_FETCH_PASSWORD is not set")
            raise InvalidRequest(
                "uploads through the object store are not configured on this platform; ask the operator"
            )
        try:
            nc = await natsconn.connect(
                self.settings.nats_url,
                user=f"{tenancy.FETCH_USER_PREFIX}{tenant}",
                password=self.settings.nats_fetch_password,
                name=f"aube-controlplane-fetch-{tenant}",
                inbox_prefix=tenancy.FETCH_INBOX_PREFIX,  # inboxes the tenant can neither read nor publish to
                connect_timeout=5,
                max_reconnect_attempts=1,
            )
        except Exception as e:
            log.warning("cannot reach tenant %s's bundle store: %s", tenant, e)
            raise InvalidRequest(f"the {names.BUCKET_BUNDLES} object store of your account is unreachable") from e
        try:
            yield nc.jetstream()
        finally:
            with anyio.move_on_after(5, shield=True):
                await nc.close()

    async def _owned(self, name: str, tenant: str) -> FunctionEntry | None:
        """The live function `name` if `tenant` may touch it; None if there is none. Another tenant's function is
        `unknown_function` to the requester, as if it did not exist."""
        entry = await self.registry.get_function(name)
        if entry is None or entry.record.deleting:
            return None
        if not tenancy.may_touch(tenant, entry.record.tenant):
            raise UnknownFunction(f"no function named {name!r}")
        return entry

    async def _check_name_free_for(self, name: str, tenant: str) -> None:
        entry = await self.registry.get_function(name)
        if entry is not None and not entry.record.deleting and not tenancy.may_touch(tenant, entry.record.tenant):
            raise NameTaken(f"the name {name!r} is taken by another tenant's function; choose another")

    async def _check_quota(self, name: str, tenant: str) -> None:
        """A tenant's new name is refused once it has `tenant_max_functions` (uploads of other new names running at
        the same moment, at most `tenant_max_requests`, may go past it by that many)."""
        if tenant == tenancy.OPERATOR:
            return
        owned = {f.record.name for f in await self.registry.functions() if f.record.tenant == tenant}
        if name not in owned and len(owned) >= self.settings.tenant_max_functions:
            raise QuotaExceeded(
                f"you have {len(owned)} functions, the most this platform allows; delete one to deploy {name!r}"
            )

    async def upload(self, req: UploadRequest, tenant: str = tenancy.OPERATOR) -> UploadReply:
        name = names.validate_name(req.name)
        # Before anything is read or built: a name another tenant owns is refused at once.
        await self._check_name_free_for(name, tenant)
        await self._check_quota(name, tenant)
        # Each waiting upload holds its request (up to the NATS max payload): a burst of them is answered at once
        # instead of piling up in memory.
        if self._intake.statistics().tasks_waiting >= self.settings.max_waiting_uploads:
            raise CapacityExhausted(
                f"the control plane is busy with {self.settings.max_parallel_uploads} uploads and"
                f" {self.settings.max_waiting_uploads} waiting; retry later"
            )
        workdir = self.work_dir / uuid.uuid4().hex
        try:
            async with self._intake:
                source = await self._bundle_source(req, workdir, tenant)
                try:
                    root, manifest = await anyio.to_thread.run_sync(
                        validate_bundle, source, workdir / "bundle", self.limits
                    )
                except AubeError as e:
                    await self.emit(name, "failed", tenant=tenant, message=e.message, code=e.code)
                    raise
            async with self._function_lock(name):
                try:
                    await self._check_name_free_for(name, tenant)
                    await self._check_quota(name, tenant)
                    return await self._deploy(name, root, manifest, tenant)
                except AubeError as e:
                    await self.emit(name, "failed", tenant=tenant, message=e.message, code=e.code)
                    raise
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lambda: shutil.rmtree(workdir, ignore_errors=True))

    async def _next_version(self, name: str, existing: FunctionEntry | None) -> int:
        # Versions never repeat for a name, even across a delete: an old version's image may still serve a stream.
        seen = [existing.record.version] if existing else []
        seen += [a.version for a in await self.runtime.artifacts(self.owner) if a.function == name]
        seen += [e.record.version for e in await self.registry.instances(name)]
        return max(seen, default=0) + 1

    async def _prepare(self, name: str, version: int, root: Path, manifest: Manifest, tenant: str) -> str:
        """Build the version, streaming its output as `build` events. Runtimes may log from worker threads."""
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[str | None] = asyncio.Queue()

        def build_log(line: str) -> None:
            loop.call_soon_threadsafe(lines.put_nowait, line)

        async def publish_lines() -> None:
            sent = 0
            while (line := await lines.get()) is not None:
                log.debug("build %s v%d: %s", name, version, self.redactor.for_log(line))
                sent += 1
                if sent <= MAX_BUILD_EVENTS:
                    await self.emit(name, "build", tenant=tenant, version=version, message=line)
            if sent > MAX_BUILD_EVENTS:
                more = f"[{sent - MAX_BUILD_EVENTS} more lines]"
                await self.emit(name, "build", tenant=tenant, version=version, message=more)

        # The build runs in this task, not in the group: its error must reach the caller as itself, not wrapped
        # in an ExceptionGroup.
        failure: BaseException | None = None
        artifact = ""
        async with anyio.create_task_group() as tg:
            tg.start_soon(publish_lines)
            try:
                artifact = await self.runtime.prepare(name, version, root, manifest, self.owner, build_log)
            except Exception as e:
                failure = e
            finally:
                lines.put_nowait(None)
        if failure is not None:
            raise failure
        return artifact

    async def _deploy(self, name: str, root: Path, manifest: Manifest, tenant: str) -> UploadReply:
        # A new function's created_at: before its first instances start, so that every instance of the current
        # owner is at least as new as its function (and every instance older than that is an earlier owner's).
        begun = time.time()
        existing = await self.registry.get_function(name)
        live = existing is not None and not existing.record.deleting
        if live and existing is not None and not tenancy.may_touch(tenant, existing.record.tenant):
            # Checked again here, on the record this deploy replaces: another control plane may have given the
            # name to another tenant since `upload` checked it (during the bundle's validation, say).
            raise NameTaken(f"the name {name!r} is taken by another tenant's function; choose another")
        # A re-upload keeps the function's owner (the operator may re-upload a tenant's function); a new name, or one
        # whose delete is finishing, belongs to whoever uploads it.
        owner = existing.record.tenant if live and existing is not None else tenant
        version = await self._next_version(name, existing)
        await self.emit(name, "accepted", tenant=owner, version=version)
        artifact = await self._prepare(name, version, root, manifest, owner)
        started: list[InstanceEntry] = []
        try:
            # At least one instance is health-checked even for a scale-to-zero function: a broken version must fail
            # its upload, not its first stream.
            wanted = max(manifest.scaling.min_free, 1)
            await self._make_room(name, version, manifest.scaling.max_instances, wanted)
            started = await self._start_instances(name, version, artifact, manifest, wanted)
            if not started:
                raise CapacityExhausted(f"{name}: all {manifest.scaling.max_instances} instance slots are in use")
            now = time.time()
            record = FunctionRecord(
                name=name,
                version=version,
                manifest=manifest,
                artifact=artifact,
                runtime=self.runtime.kind,
                created_at=existing.record.created_at if live and existing is not None else begun,
                updated_at=now,
                tenant=owner,
            )
            if await self.registry.put_function(record, existing.revision if existing else None) is None:
                raise AubeError(
                    f"{name} was changed by another upload at the same moment; upload again", code="conflict"
                )
        except BaseException:
            with anyio.move_on_after(CLEANUP_SECONDS, shield=True):
                for entry in started:
                    await self._stop_entry(entry, reason="upload failed")
                await self.runtime.remove_artifact(artifact)
            raise
        # The version is live. Its instances become claimable; the probe of a scale-to-zero function goes.
        keep = manifest.scaling.min_free
        for entry in started[keep:]:
            await self._stop_entry(entry, reason="health probe done")
        ready = [e for e in started[:keep] if await self._mark_free(e)]
        if existing is not None:
            await self._retire_old_versions(name, current=version, deadline=None)
        await self.emit(name, "ready", tenant=owner, version=version, instances=len(ready))
        log.info("function %s version %d ready with %d warm instance(s)", name, version, len(ready))
        return UploadReply(name=name, version=version, url=self._url(name), instances=len(ready))

    async def _make_room(self, name: str, version: int, max_instances: int, wanted: int) -> None:
        """Free slots for a new version by stopping free instances of older ones, when the old version would
        otherwise hold every slot (e.g. max_instances = 1). Busy ones keep streaming; nothing is cut."""
        entries = await self.registry.instances(name)
        shortfall = wanted - (max_instances - len(entries))
        for entry in sorted(entries, key=lambda e: e.record.last_used):
            if shortfall <= 0:
                return
            if entry.record.version < version and entry.record.state == "free":
                shortfall -= await self._drain_and_stop(entry, reason="making room for a new version")

    def _url(self, name: str) -> str:
        return f"{self.settings.public_url.rstrip('/')}/{name}"

    # -- instances ---------------------------------------------------------------------------------------------

    async def _start_instances(
        self, name: str, version: int, artifact: str, manifest: Manifest, count: int, *, claimable: bool = False
    ) -> list[InstanceEntry]:
        """Start up to `count` instances concurrently, each in a slot it won by compare-and-set, and health-check
        them. With `claimable`, each becomes "free" the moment it is healthy (a scale-out: waiting clients should
        not wait for the slowest sibling); otherwise they stay "starting" until the caller marks them free. Fewer
        than `count` come back when slots run out; if every start fails, the first failure is raised."""
        taken = {e.record.slot for e in await self.registry.instances(name)}
        results: list[InstanceEntry] = []
        errors: list[AubeError] = []

        async def start_one() -> None:
            try:
                entry = await self._start_instance(name, version, artifact, manifest, taken, claimable)
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
        return await self._start_instances(fn.name, fn.version, fn.artifact, fn.manifest, count, claimable=True)

    async def _start_instance(
        self, name: str, version: int, artifact: str, manifest: Manifest, taken: set[int], claimable: bool
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
                runtime=self.runtime.kind,
                owner=self.owner,
                created_at=now,
                secret=secret,
            )
            revision = await self.registry.create_instance(record)
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
            owner=self.owner,
            secret=secret,
        )
        key = names.instance_key(name, record.slot)
        self.in_flight.add(instance_id)
        self._in_flight_during_pass.add(instance_id)
        started: StartedInstance | None = None
        try:
            started = await self.runtime.start(spec)
            handle = started.handle
            await wait_healthy(
                started.address,
                instance_id,
                self.settings.health_timeout,
                lambda: self.runtime.is_alive(handle),
                secret,
            )
            address, handle = started.address, started.handle

            def healthy(rec: InstanceRecord) -> InstanceRecord:
                rec = lifecycle.started(rec, address, handle, instance_id=instance_id)
                return lifecycle.mark_free(rec, time.time()) if claimable else rec

            outcome = await self.registry.apply(key, healthy, entry=InstanceEntry(key, revision, record))
            if not isinstance(outcome, Written):
                raise AubeError(f"instance slot {key} was taken over while starting", code="conflict")
            log.info("instance %s of %s v%d healthy at %s", instance_id, name, version, started.address)
            return outcome.entry
        except BaseException:
            with anyio.move_on_after(CLEANUP_SECONDS, shield=True):
                if started is not None:
                    await self.runtime.stop(started.handle)
                # Only our own entry: once a delete retired this slot, another upload (another tenant's, when
                # the name was taken over during its delete) may have started its instance in it.
                await self.registry.delete_instance(key, revision)
            raise
        finally:
            self.in_flight.discard(instance_id)

    async def _mark_free(self, entry: InstanceEntry) -> bool:
        mark_free = partial(lifecycle.mark_free, now=time.time(), instance_id=entry.record.instance_id)
        return isinstance(await self.registry.apply(entry.key, mark_free, entry=entry), Written)

    async def _stop_entry(self, entry: InstanceEntry, *, reason: str) -> None:
        """Stop an instance and drop its entry. Callers have ensured no stream uses it (or its grace is over)."""
        r = entry.record
        if r.handle:
            await self.runtime.stop(r.handle)
        else:
            # Started by a process that died before recording the handle: find it by its labels.
            for running in await self.runtime.instances(self.owner):
                if running.instance_id == r.instance_id:
                    await self.runtime.stop(running.handle)
        await self.registry.delete_instance(entry.key, entry.revision)
        log.info("instance %s of %s v%d stopped: %s", r.instance_id, r.function, r.version, reason)

    async def _drain_and_stop(self, entry: InstanceEntry, *, reason: str, busy_ok: bool = False) -> bool:
        """-> draining by compare-and-set, then stop. False if a proxy claimed it meanwhile (or it is gone)."""
        drain = partial(lifecycle.drain, busy_ok=busy_ok, instance_id=entry.record.instance_id)
        outcome = await self.registry.apply(entry.key, drain, entry=entry)
        if not isinstance(outcome, Written):
            return False
        await self._stop_entry(outcome.entry, reason=reason)
        return True

    async def _retire_old_versions(self, name: str, *, current: int | None, deadline: float | None) -> tuple[int, int]:
        """Retire every instance of `name` older than `current` (all of them when None): free ones stop now, busy
        ones finish their stream (until `deadline`, if any). Returns (stopped, still streaming)."""
        stopped = streaming = 0
        for entry in await self.registry.instances(name):
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
                if await self._drain_and_stop(entry, reason="retired"):
                    return "stopped"
            else:
                retire = partial(lifecycle.retire, deadline=deadline, instance_id=instance_id)
                outcome = await self.registry.apply(entry.key, retire, entry=entry, attempts=1)
                if isinstance(outcome, Written):
                    return "streaming"
            got = await self.registry.get_instance(entry.key)
            if got is None or got.record.instance_id != instance_id:
                return "gone"
            entry = got
        # Still changing under us: retirement (retire_pass) finishes the job on its next round.
        return "streaming"

    # -- requests from proxies and reapers ---------------------------------------------------------------------

    async def scale(self, req: ScaleRequest) -> ScaleReply:
        name = names.validate_name(req.name)
        function = await self.registry.get_function(name)
        if function is None or function.record.deleting:
            raise UnknownFunction(f"no function named {name!r}")
        f = function.record
        count = max(1, min(req.count, f.manifest.scaling.max_instances))
        self.scaling.add(name)
        try:
            ready = await self._start_instances(name, f.version, f.artifact, f.manifest, count, claimable=True)
        finally:
            self.scaling.discard(name)
        if not ready:
            raise CapacityExhausted(f"{name} already runs its maximum of {f.manifest.scaling.max_instances} instances")
        total = len(await self.registry.instances(name))
        await self.emit(name, "scaled", tenant=f.tenant, version=f.version, instances=total)
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
        entry = await self.registry.get_instance(names.instance_key(name, req.slot))
        if entry is None or entry.record.instance_id != req.instance_id:
            return StopInstanceReply(stopped=False)  # already gone: stopping is idempotent
        if entry.record.state == "busy":
            raise InvalidRequest(f"instance {req.instance_id} of {name} is carrying a stream; drain it first")
        if entry.record.state == "starting":
            raise InvalidRequest(f"instance {req.instance_id} of {name} is still starting")
        stopped = await self._drain_and_stop(entry, reason=req.reason or "requested")
        if not stopped:
            raise InvalidRequest(f"instance {req.instance_id} of {name} was claimed meanwhile; not stopped")
        function = await self.registry.get_function(name)
        tenant = tenancy.OPERATOR
        # An instance started before the current function record was created belongs to an earlier owner of the
        # name (taken over during its delete): the current owner hears nothing of it.
        if function is not None and entry.record.created_at >= function.record.created_at:
            tenant = function.record.tenant
        await self.emit(name, "stopped", tenant=tenant, message=f"instance {req.instance_id}: {req.reason}")
        return StopInstanceReply(stopped=True)

    # -- delete and list ---------------------------------------------------------------------------------------

    async def delete(self, req: DeleteRequest, tenant: str = tenancy.OPERATOR) -> DeleteReply:
        name = names.validate_name(req.name)
        async with self._function_lock(name):
            function = await self._owned(name, tenant)
            if function is None:
                raise UnknownFunction(f"no function named {name!r}")
            marked = msgspec.structs.replace(function.record, deleting=True, updated_at=time.time())
            if await self.registry.put_function(marked, function.revision) is None:
                raise AubeError(f"{name} changed while deleting it; try again", code="conflict")
            grace = self.settings.delete_grace if req.grace is None else max(0.0, req.grace)
            stopped, streaming = await self._retire_old_versions(name, current=None, deadline=time.time() + grace)
            if streaming == 0:
                await self._finish_delete(name)
        await self.emit(
            name,
            "deleted",
            tenant=function.record.tenant,
            message=f"{stopped} stopped, {streaming} finishing their streams",
        )
        log.info("function %s deleted: %d instance(s) stopped, %d still streaming", name, stopped, streaming)
        return DeleteReply(name=name, stopped=stopped, draining=streaming)

    async def _finish_delete(self, name: str) -> None:
        """The last instance of a deleted function is gone: drop its record and every prepared version."""
        for artifact in await self.runtime.artifacts(self.owner):
            if artifact.function == name:
                await self.runtime.remove_artifact(artifact.ref)
        entry = await self.registry.get_function(name)
        if entry is not None and entry.record.deleting:
            await self.registry.delete_function(name)

    async def list(self, req: ListRequest, tenant: str = tenancy.OPERATOR) -> ListReply:
        functions = [
            f
            for f in await self.registry.functions()
            if not f.record.deleting and tenancy.may_touch(tenant, f.record.tenant)
        ]
        if req.name is not None:
            functions = [f for f in functions if f.record.name == req.name]
        instances = await self.registry.instances()
        summaries = []
        for f in sorted(functions, key=lambda f: f.record.name):
            mine = [e.record for e in instances if e.record.function == f.record.name]
            summaries.append(
                FunctionSummary(
                    name=f.record.name,
                    version=f.record.version,
                    instances=len(mine),
                    free=sum(r.state == "free" for r in mine),
                    busy=sum(r.state == "busy" for r in mine),
                    runtime=f.record.runtime,
                    min_free=f.record.manifest.scaling.min_free,
                    max_instances=f.record.manifest.scaling.max_instances,
                    url=self._url(f.record.name),
                )
            )
        return ListReply(functions=summaries)

    async def stop_everything(self) -> None:
        """Stop every instance this control plane owns and drop their entries (a clean platform shutdown)."""
        for entry in await self.registry.instances():
            if entry.record.owner == self.owner:
                await self._stop_entry(entry, reason="platform shutdown")
        for running in await self.runtime.instances(self.owner):
            await self.runtime.stop(running.handle)

    # -- housekeeping ------------------------------------------------------------------------------------------

    async def retire_pass(self) -> None:
        """Stop what retirement, delete's grace or a lost stop request left behind; finish deletes."""
        now = time.time()
        entries = await self.registry.instances()
        functions = await self.registry.functions()
        live = {(e.key, e.revision) for e in entries if e.record.state in ("draining", "unhealthy")}
        self._first_seen = {k: self._first_seen.get(k, now) for k in live}
        plan = decisions.plan_retirement(
            owner=self.owner,
            entries=entries,
            functions=functions,
            in_flight=self.in_flight,
            now=now,
            stale_after=STALE_DRAINING_SECONDS,
            first_seen=self._first_seen,
        )
        for entry in plan.stop:
            if entry.record.function in self.uploading:
                # An upload or delete of this function holds its lock and retires these instances itself; stopping
                # them here too raced it (a delete counted fewer instances stopped than it had).
                continue
            if entry.record.state == "busy":
                log.warning(
                    "instance %s of deleted %s still streaming after the grace period: stopping it",
                    entry.record.instance_id,
                    entry.record.function,
                )
                await self._drain_and_stop(entry, reason="delete grace period over", busy_ok=True)
            else:
                await self._drain_and_stop(entry, reason="retired")
        for name in plan.finished_deletes:
            if name not in self.uploading:
                await self._finish_delete(name)

    async def reconcile(self, *, startup: bool = False) -> decisions.ReconcilePlan:
        """Make the runtime and the registry agree; see decisions.plan_reconcile for the rules and the order.

        The runtime listing is older than the plan: an instance listed while still being created (not yet running)
        may have finished starting by the time the plan is made. So every instance that was in flight at any
        moment of this pass counts as in flight, not just those still starting at the end.
        """
        self._in_flight_during_pass = set(self.in_flight)
        running = await self.runtime.instances(self.owner)
        artifacts = await self.runtime.artifacts(self.owner)
        entries = await self.registry.instances()
        functions = await self.registry.functions()
        plan = decisions.plan_reconcile(
            owner=self.owner,
            running=running,
            entries=entries,
            functions=functions,
            artifacts=artifacts,
            in_flight=self._in_flight_during_pass | self.in_flight,
            busy_uploads=set(self.uploading),
            now=time.time(),
            start_timeout=self.settings.start_timeout,
            startup=startup,
        )
        for handle in plan.stop_handles:
            log.warning("reconcile: stopping instance %s, unknown to the registry or exited", handle)
            await self.runtime.stop(handle)
        for entry in plan.delete_entries:
            log.warning("reconcile: dropping registry entry %s, its instance is gone", entry.key)
            await self.registry.delete_instance(entry.key, entry.revision)
        for ref in plan.remove_artifacts:
            log.info("reconcile: removing unused version %s", ref)
            await self.runtime.remove_artifact(ref)
        return plan
