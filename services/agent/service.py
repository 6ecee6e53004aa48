"""A host's agent: this machine's runtime (Docker or processes) behind `aube.host.<host id>.<operation>`.

The control plane places instances on hosts (`controlplane/runtimes/hosts.py`) and asks the chosen host's agent to
prepare versions, start, stop and list instances (`hostwire.py` has the messages). The agent:
- keeps its host lease (BUCKET_HOSTS: runtime kind, capacity, instances running) renewed every ttl/3, deleted on a
  clean exit; a host whose lease expires is dead to the reaper, which recycles its instances' entries;
- prepares versions for its own engine from the folders the control plane puts in BUCKET_ARTIFACTS, at upload time
  or when first asked to start a version it lacks (a host that joined later);
- publishes each exit its engine reports on `aube.host.<id>.exited`, so the control plane drops the entry at once;
- ships its instances' output for `aube logs` (controlplane/logship.py), on subjects naming this host;
- reconciles its own engine every `reconcile_interval`: it stops the owner's instances no registry entry knows (a
  start whose answer was lost, an entry recycled while this host was away) and reports as exited every entry placed
  here whose instance is gone. The registry is the control plane's to write: the agent only reads it.

Instances are kept under a host-scoped owner (`<owner>-<host id>`), so several agents can share one engine or one
process table (a test rig on one machine) without taking each other's instances for strays.
"""

from __future__ import annotations

import asyncio
import logging
import tarfile
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from aube.controlplane.logship import LogShipper, ship_output
from aube.controlplane.objects import fetch_object
from aube.controlplane.runtimes import hostwire
from aube.controlplane.runtimes.base import Artifact, InstanceSpec, Runtime
from aube.controlplane.runtimes.hosts import open_host_buckets
from aube.controlplane.runtimes.local import select_local_runtime
from aube.controlplane.runtimes.output import OutputSource
from aube.shared import agentlogins, kvread, leasing, names, natsconn, records
from aube.shared.errors import AubeError, InvalidRequest, RuntimeFailure
from aube.shared.hostbook import HostBook
from aube.shared.schemas import HostLease, InstanceRecord, decode, encode, error_reply
from aube.shared.settings import AgentSettings, ControlPlaneSettings

log = logging.getLogger(__name__)

MAX_LOG_LINES = 200  # build output returned to the control plane per prepare


async def serve(
    settings: AgentSettings,
    *,
    runtime_settings: ControlPlaneSettings,
    runtime: Runtime | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    host_id = names.validate_host_id(settings.host_id)
    runtime = runtime if runtime is not None else await select_local_runtime(runtime_settings)
    nc = await natsconn.connect(
        settings.nats_url,
        user=settings.nats_user,
        password=settings.nats_password,
        name=f"aube-agent-{host_id}",
        max_reconnect_attempts=-1,
        # The only inboxes this host's NATS user may subscribe to (aube.shared.agentlogins).
        inbox_prefix=agentlogins.inbox_prefix(host_id),
    )
    try:
        hosts_kv, _ = await open_host_buckets(nc, replicas=settings.kv_replicas)
        agent = Agent(settings, runtime_settings, runtime, nc)
        async with anyio.create_task_group() as tg:
            for operation, kind, handler in agent.routes():
                sub = await nc.subscribe(names.host_subject(host_id, operation))
                tg.start_soon(_pump, sub.messages, kind, handler, tg)
            # Subscribed (flushed) before the lease says this host is live: a control plane that reads the lease may
            # ask at once, and found no responder when the lease came first.
            await nc.flush()
            await tg.start(agent.keep_lease, hosts_kv)
            tg.start_soon(agent.publish_exits)
            tg.start_soon(agent.reconcile_loop)
            if isinstance(runtime, OutputSource):
                # Its instances' output, on the log subjects naming this host (all its NATS user may publish there).
                shipper = LogShipper(nc, host_id, runtime_settings)
                tg.start_soon(ship_output, runtime, agent.local_owner, shipper)
            await nc.flush()
            log.info("agent of host %s serving its %s runtime (capacity %d)", host_id, runtime.kind, settings.capacity)
            task_status.started()
    finally:
        with anyio.move_on_after(60, shield=True):
            if runtime_settings.stop_instances_on_exit:
                for running in await runtime.instances(f"{runtime_settings.owner}-{host_id}"):
                    await runtime.stop(running.handle)
        with anyio.move_on_after(5, shield=True):
            await nc.drain()
            await runtime.close()


async def _pump(
    messages: Any, kind: type[msgspec.Struct], handler: Callable[[Any], Awaitable[msgspec.Struct]], tg: TaskGroup
) -> None:
    async for msg in messages:
        tg.start_soon(_answer, msg, kind, handler)


async def _answer(msg: Msg, kind: type[msgspec.Struct], handler: Callable[[Any], Awaitable[msgspec.Struct]]) -> None:
    try:
        reply = encode(await handler(decode(msg.data, kind)))
    except AubeError as e:
        log.info("%s refused: %s (%s)", msg.subject, e.message, e.code)
        reply = error_reply(e)
    except Exception as e:  # a bug in one request must not end the agent
        log.exception("%s failed", msg.subject)
        reply = error_reply(RuntimeFailure(f"the host agent failed: {type(e).__name__}"))
    if msg.reply:
        await msg.respond(reply)


class Agent:
    def __init__(self, settings: AgentSettings, runtime_settings: ControlPlaneSettings, runtime: Runtime, nc: NATS):
        self.settings = settings
        self.host_id = settings.host_id
        self.owner = runtime_settings.owner  # the control plane's scope, as requests name it
        self.local_owner = f"{self.owner}-{self.host_id}"  # this host's share of it, in the engine
        self.runtime = runtime
        self.nc = nc
        self.max_bundle_bytes = runtime_settings.max_extracted_bytes + 16 * 1024 * 1024  # a tar's headers and padding
        self.work_dir = Path(runtime_settings.data_dir) / "agent" / self.host_id
        self._builds: dict[tuple[str, int], anyio.Lock] = {}
        self.starting: set[str] = set()  # instance ids being started here
        self._exits: asyncio.Queue[str] = asyncio.Queue()

    def routes(self) -> list[tuple[str, type[msgspec.Struct], Callable[[Any], Awaitable[msgspec.Struct]]]]:
        return [
            (hostwire.OP_PREPARE, hostwire.PrepareOnHost, self.prepare),
            (hostwire.OP_START, hostwire.StartOnHost, self.start),
            (hostwire.OP_STOP, hostwire.HandleOnHost, self.stop),
            (hostwire.OP_ALIVE, hostwire.HandleOnHost, self.alive),
            (hostwire.OP_LIST, hostwire.ListOnHost, self.listing),
            (hostwire.OP_REMOVE_ARTIFACT, hostwire.RemoveArtifactOnHost, self.remove_artifact),
        ]

    def _check_owner(self, owner: str) -> None:
        if owner != self.owner:
            raise InvalidRequest(f"this host serves the control plane of {self.owner!r}, not {owner!r}")

    # -- the lease -----------------------------------------------------------------------------------------

    async def keep_lease(self, book: HostBook, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        started_at = time.time()
        ttl = self.settings.lease_ttl

        async def put() -> None:
            running = len(await self.runtime.instances(self.local_owner))
            lease = HostLease(
                host_id=self.host_id,
                runtime=self.runtime.kind,
                capacity=self.settings.capacity,
                running=running,
                started_at=started_at,
                renewed_at=time.time(),
                ttl=ttl,
            )
            await book.put(lease)

        await put()
        task_status.started()
        try:
            await leasing.renew_forever(put, ttl, "host lease")
        finally:
            with anyio.move_on_after(5, shield=True):
                await book.delete(self.host_id)
                log.info("host lease %s deleted", self.host_id)

    # -- versions ------------------------------------------------------------------------------------------

    async def _local_artifact(self, function: str, version: int) -> Artifact | None:
        for artifact in await self.runtime.artifacts(self.local_owner):
            if artifact.function == function and artifact.version == version:
                return artifact
        return None

    async def _ensure_prepared(self, function: str, version: int, manifest: Any, lines: list[str]) -> str:
        """The engine's own ref of a version, built from BUCKET_ARTIFACTS first if this host lacks it."""
        lock = self._builds.setdefault((function, version), anyio.Lock())
        async with lock:
            found = await self._local_artifact(function, version)
            if found is not None:
                return found.ref
            self.work_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self.work_dir) as tmp:
                archive = Path(tmp) / "bundle.tar"
                folder = Path(tmp) / "fn"
                key = hostwire.bundle_key(self.owner, function, version)
                await fetch_object(
                    self.nc.jetstream(), names.BUCKET_ARTIFACTS, key, archive, self.max_bundle_bytes, keep=True
                )

                def unpack() -> None:
                    folder.mkdir()
                    with tarfile.open(archive) as tar:
                        extract_plain(tar, folder)

                await anyio.to_thread.run_sync(unpack)
                return await self.runtime.prepare(function, version, folder, manifest, self.local_owner, lines.append)

    async def prepare(self, req: hostwire.PrepareOnHost) -> hostwire.Prepared:
        self._check_owner(req.owner)
        lines: list[str] = []
        await self._ensure_prepared(req.function, req.version, req.manifest, lines)
        return hostwire.Prepared(log=lines[-MAX_LOG_LINES:])

    async def remove_artifact(self, req: hostwire.RemoveArtifactOnHost) -> hostwire.Done:
        self._check_owner(req.owner)
        parsed = hostwire.parse_artifact_ref(req.ref)
        if parsed is not None:
            found = await self._local_artifact(*parsed)
            if found is not None:
                await self.runtime.remove_artifact(found.ref)
        return hostwire.Done()

    # -- instances -----------------------------------------------------------------------------------------

    async def start(self, req: hostwire.StartOnHost) -> hostwire.Started:
        spec = req.spec
        self._check_owner(spec.owner)
        parsed = hostwire.parse_artifact_ref(spec.artifact)
        if parsed is None:
            raise InvalidRequest(f"artifact {spec.artifact!r} is not a host-independent ref")
        running = await self.runtime.instances(self.local_owner)
        if len(running) + len(self.starting) >= self.settings.capacity:
            raise RuntimeFailure(f"host {self.host_id} runs its capacity of {self.settings.capacity} instances")
        self.starting.add(spec.instance_id)
        try:
            ref = await self._ensure_prepared(parsed[0], parsed[1], spec.manifest, [])
            local: InstanceSpec = msgspec.structs.replace(spec, artifact=ref, owner=self.local_owner)
            started = await self.runtime.start(local)
        finally:
            self.starting.discard(spec.instance_id)
        log.info("started %s of %s v%d at %s", spec.instance_id, spec.function, spec.version, started.address)
        return hostwire.Started(instance=started)

    async def stop(self, req: hostwire.HandleOnHost) -> hostwire.Done:
        await self.runtime.stop(req.handle)
        return hostwire.Done()

    async def alive(self, req: hostwire.HandleOnHost) -> hostwire.Alive:
        return hostwire.Alive(alive=await self.runtime.is_alive(req.handle))

    async def listing(self, req: hostwire.ListOnHost) -> hostwire.Listing:
        if req.owner != self.owner:
            return hostwire.Listing()
        artifacts = [
            Artifact(ref=hostwire.artifact_ref(a.function, a.version), function=a.function, version=a.version)
            for a in await self.runtime.artifacts(self.local_owner)
        ]
        return hostwire.Listing(instances=await self.runtime.instances(self.local_owner), artifacts=artifacts)

    # -- exits and reconcile -------------------------------------------------------------------------------

    async def publish_exits(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.runtime.watch_exits, self.local_owner, self._exits.put_nowait)
            while True:
                handle = await self._exits.get()
                await self._report_exit(handle)

    async def _report_exit(self, handle: str) -> None:
        event = hostwire.Exited(owner=self.owner, handle=handle)
        try:
            await self.nc.publish(names.host_subject(self.host_id, names.HOST_EXITS), encode(event))
        except Exception as e:  # reconcile reports it again
            log.warning("could not report the exit of %s: %s", handle, e)

    async def reconcile_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.reconcile_interval)
            try:
                await self.reconcile()
            except Exception as e:  # NATS away, the engine slow: the next round tries again
                log.warning("host reconcile failed: %s", e)

    async def reconcile(self) -> None:
        """Stop the owner's instances no entry knows; report as exited the entries here whose instance is gone.

        The listing is taken before the entries are read: an instance is started after its entry exists, so one
        absent from a later read really has no entry."""
        starting = set(self.starting)
        running = await self.runtime.instances(self.local_owner)
        entries = [
            record
            for e in await kvread.snapshot(self.nc.jetstream(), names.BUCKET_INSTANCES)
            if e.value and (record := records.read(e.key, e.value, InstanceRecord)) is not None
        ]
        known = {r.instance_id for r in entries if r.owner == self.owner}
        starting |= self.starting
        for instance in running:
            if instance.instance_id not in known and instance.instance_id not in starting:
                log.warning(
                    "reconcile: stopping %s of %s, unknown to the registry", instance.instance_id, instance.function
                )
                await self.runtime.stop(instance.handle)
        alive = {i.instance_id for i in running if i.alive}
        prefix = self.host_id + "/"
        for record in entries:
            if record.host == self.host_id and record.handle.startswith(prefix) and record.instance_id not in alive:
                await self._report_exit(record.handle[len(prefix) :])


def extract_plain(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract a version's folder: regular files and folders only, each inside `dest`. The control plane wrote the tar
    from a validated bundle, but a host trusts no path: this is tarfile's "data" filter, which Debian bookworm's
    Python (3.11.2) lacks."""
    root = dest.resolve()
    for member in tar.getmembers():
        target = (dest / member.name).resolve()
        if root not in target.parents and not (member.isdir() and target == root):
            raise RuntimeFailure(f"a version's folder names a path outside it: {member.name[:80]!r}")
        if not (member.isfile() or member.isdir()):
            raise RuntimeFailure(f"a version's folder holds something other than files: {member.name[:80]!r}")
        if member.isdir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        source = tar.extractfile(member)
        assert source is not None
        with source, target.open("wb") as out:
            while chunk := source.read(1 << 20):
                out.write(chunk)
        target.chmod(0o755 if member.mode & 0o111 else 0o644)
