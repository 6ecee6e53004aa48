"""Uploads: from a deployer's bundle to a live version with warm instances.

Its own module because an upload is the one long request: it reads the bundle (a base64 body, or an object in the
tenant's own store), checks the name and the tenant's quota, validates and builds with `build` events, starts and
health-checks the new version's instances, writes the function record, and only then retires the old version.
Intake is bounded: a few uploads at a time, a bounded number waiting, the rest refused at once.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from nats.js import JetStreamContext

from aube.controlplane.bundle import decode_base64, validate_bundle
from aube.controlplane.context import CLEANUP_SECONDS, Context
from aube.controlplane.instances import Instances
from aube.controlplane.objects import fetch_object
from aube.shared import names, natsconn
from aube.shared import tenants as tenancy
from aube.shared.errors import AubeError, CapacityExhausted, InvalidRequest, NameTaken, QuotaExceeded
from aube.shared.registry import FunctionEntry, InstanceEntry
from aube.shared.schemas import FunctionRecord, Manifest, UploadReply, UploadRequest

log = logging.getLogger(__name__)

# Build output lines sent as `build` events per build; the rest are counted in one last event.
MAX_BUILD_EVENTS = 500


class Uploads:
    def __init__(self, ctx: Context, instances: Instances) -> None:
        self.ctx = ctx
        self.instances = instances
        # Where object uploads are read from; the bucket's stream follows nats' naming (objects.STREAM_TEMPLATE).
        self.bundle_bucket = names.BUCKET_BUNDLES
        # Fetching and extracting bundles costs disk, memory and CPU per upload: a few at a time, others wait.
        self._intake = anyio.CapacityLimiter(max(1, ctx.settings.max_parallel_uploads))

    async def _bundle_source(self, req: UploadRequest, workdir: Path, tenant: str) -> bytes | Path:
        """The upload's archive: bytes for a base64 body (bounded by the NATS payload), a file in `workdir` for
        an object, streamed there in bounded memory (the object is removed from the store either way)."""
        sources = [s for s in (req.zip, req.tar, req.object) if s is not None]
        if len(sources) != 1:
            raise InvalidRequest('an upload carries exactly one of "zip", "tar" (base64) or "object" (a bundle key)')
        if req.object is None:
            return decode_base64(sources[0], self.ctx.limits.max_compressed_bytes)
        await anyio.to_thread.run_sync(lambda: workdir.mkdir(parents=True, exist_ok=True))
        path = workdir / "bundle.archive"
        async with self._bundle_jetstream(tenant) as js:
            await fetch_object(js, self.bundle_bucket, req.object, path, self.ctx.limits.max_compressed_bytes)
        return path

    @asynccontextmanager
    async def _bundle_jetstream(self, tenant: str) -> AsyncIterator[JetStreamContext]:
        """The JetStream holding a requester's bundles: the tenant's own account's (read as that account's
        `aube-fetch-<tenant>` user), or this account's for the operator (and servers without accounts, where every
        request is the operator's)."""
        if tenant == tenancy.OPERATOR:
            yield self.ctx.nc.jetstream()
            return
        if not self.ctx.settings.nats_fetch_password:
            # Never this account's store for a tenant: a key it names could be the operator's bundle in flight.
            log.warning("a tenant's object upload is refused: AUBE_NATS_FETCH_PASSWORD is not set")
            raise InvalidRequest(
                "uploads through the object store are not configured on this platform; ask the operator"
            )
        try:
            nc = await natsconn.connect(
                self.ctx.settings.nats_url,
                user=f"{tenancy.FETCH_USER_PREFIX}{tenant}",
                password=self.ctx.settings.nats_fetch_password,
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

    async def _check_name_free_for(self, name: str, tenant: str) -> None:
        entry = await self.ctx.registry.get_function(name)
        if entry is not None and not entry.record.deleting and not tenancy.may_touch(tenant, entry.record.tenant):
            raise NameTaken(f"the name {name!r} is taken by another tenant's function; choose another")

    async def _check_quota(self, name: str, tenant: str) -> None:
        """A tenant's new name is refused once it has `tenant_max_functions` (uploads of other new names running at
        the same moment, at most `tenant_max_requests`, may go past it by that many)."""
        if tenant == tenancy.OPERATOR:
            return
        owned = {f.record.name for f in await self.ctx.registry.functions() if f.record.tenant == tenant}
        if name not in owned and len(owned) >= self.ctx.settings.tenant_max_functions:
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
        if self._intake.statistics().tasks_waiting >= self.ctx.settings.max_waiting_uploads:
            raise CapacityExhausted(
                f"the control plane is busy with {self.ctx.settings.max_parallel_uploads} uploads and"
                f" {self.ctx.settings.max_waiting_uploads} waiting; retry later"
            )
        workdir = self.ctx.work_dir / uuid.uuid4().hex
        try:
            async with self._intake:
                source = await self._bundle_source(req, workdir, tenant)
                try:
                    root, manifest = await anyio.to_thread.run_sync(
                        validate_bundle, source, workdir / "bundle", self.ctx.limits
                    )
                except AubeError as e:
                    await self.ctx.events.emit(name, "failed", tenant=tenant, message=e.message, code=e.code)
                    raise
            async with self.ctx.function_lock(name):
                try:
                    await self._check_name_free_for(name, tenant)
                    await self._check_quota(name, tenant)
                    return await self._deploy(name, root, manifest, tenant)
                except AubeError as e:
                    await self.ctx.events.emit(name, "failed", tenant=tenant, message=e.message, code=e.code)
                    raise
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lambda: shutil.rmtree(workdir, ignore_errors=True))

    async def _next_version(self, name: str, existing: FunctionEntry | None) -> int:
        # Versions never repeat for a name, even across a delete: an old version's image may still serve a stream.
        seen = [existing.record.version] if existing else []
        seen += [a.version for a in await self.ctx.runtime.artifacts(self.ctx.owner) if a.function == name]
        seen += [e.record.version for e in await self.ctx.registry.instances(name)]
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
                log.debug("build %s v%d: %s", name, version, self.ctx.redactor.for_log(line))
                sent += 1
                if sent <= MAX_BUILD_EVENTS:
                    await self.ctx.events.emit(name, "build", tenant=tenant, version=version, message=line)
            if sent > MAX_BUILD_EVENTS:
                more = f"[{sent - MAX_BUILD_EVENTS} more lines]"
                await self.ctx.events.emit(name, "build", tenant=tenant, version=version, message=more)

        # The build runs in this task, not in the group: its error must reach the caller as itself, not wrapped
        # in an ExceptionGroup.
        failure: BaseException | None = None
        artifact = ""
        began = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(publish_lines)
            try:
                artifact = await self.ctx.runtime.prepare(name, version, root, manifest, self.ctx.owner, build_log)
            except Exception as e:
                failure = e
            finally:
                lines.put_nowait(None)
        self.ctx.metrics.built(failure is None, time.monotonic() - began)
        if failure is not None:
            raise failure
        return artifact

    async def _deploy(self, name: str, root: Path, manifest: Manifest, tenant: str) -> UploadReply:
        # A new function's created_at: before its first instances start, so that every instance of the current
        # owner is at least as new as its function (and every instance older than that is an earlier owner's).
        begun = time.time()
        existing = await self.ctx.registry.get_function(name)
        live = existing is not None and not existing.record.deleting
        if live and existing is not None and not tenancy.may_touch(tenant, existing.record.tenant):
            # Checked again here, on the record this deploy replaces: another control plane may have given the
            # name to another tenant since `upload` checked it (during the bundle's validation, say).
            raise NameTaken(f"the name {name!r} is taken by another tenant's function; choose another")
        # A re-upload keeps the function's owner (the operator may re-upload a tenant's function); a new name, or one
        # whose delete is finishing, belongs to whoever uploads it.
        owner = existing.record.tenant if live and existing is not None else tenant
        version = await self._next_version(name, existing)
        await self.ctx.events.emit(name, "accepted", tenant=owner, version=version)
        artifact = await self._prepare(name, version, root, manifest, owner)
        started: list[InstanceEntry] = []
        try:
            # At least one instance is health-checked even for a scale-to-zero function: a broken version must fail
            # its upload, not its first stream.
            wanted = max(manifest.scaling.min_free, 1)
            await self._make_room(name, version, manifest.scaling.max_instances, wanted)
            started = await self.instances.start_instances(name, version, artifact, manifest, wanted, tenant=owner)
            if not started:
                raise CapacityExhausted(f"{name}: all {manifest.scaling.max_instances} instance slots are in use")
            now = time.time()
            record = FunctionRecord(
                name=name,
                version=version,
                manifest=manifest,
                artifact=artifact,
                runtime=self.ctx.runtime.kind,
                created_at=existing.record.created_at if live and existing is not None else begun,
                updated_at=now,
                tenant=owner,
            )
            if await self.ctx.registry.put_function(record, existing.revision if existing else None) is None:
                raise AubeError(
                    f"{name} was changed by another upload at the same moment; upload again", code="conflict"
                )
        except BaseException:
            with anyio.move_on_after(CLEANUP_SECONDS, shield=True):
                for entry in started:
                    await self.instances.stop_entry(entry, reason="upload failed")
                await self.ctx.runtime.remove_artifact(artifact)
            raise
        # The version is live. Its instances become claimable; the probe of a scale-to-zero function goes.
        keep = manifest.scaling.min_free
        for entry in started[keep:]:
            await self.instances.stop_entry(entry, reason="health probe done")
        ready = [e for e in started[:keep] if await self.instances.mark_free(e)]
        if existing is not None:
            await self.instances.retire_old_versions(name, current=version, deadline=None)
        await self.ctx.events.emit(name, "ready", tenant=owner, version=version, instances=len(ready))
        log.info("function %s version %d ready with %d warm instance(s)", name, version, len(ready))
        return UploadReply(name=name, version=version, url=self.ctx.url(name), instances=len(ready))

    async def _make_room(self, name: str, version: int, max_instances: int, wanted: int) -> None:
        """Free slots for a new version by stopping free instances of older ones, when the old version would
        otherwise hold every slot (e.g. max_instances = 1). Busy ones keep streaming; nothing is cut."""
        entries = await self.ctx.registry.instances(name)
        shortfall = wanted - (max_instances - len(entries))
        for entry in sorted(entries, key=lambda e: e.record.last_used):
            if shortfall <= 0:
                return
            if entry.record.version < version and entry.record.state == "free":
                shortfall -= await self.instances.drain_and_stop(entry, reason="making room for a new version")
