"""The `hosts` runtime: instances run on the hosts whose agents (services/agent) hold a lease, placed across them.

The control plane keeps its logic (slots, health checks, retirement, reconcile, the min_free keeper) and talks to
this class through the same Runtime protocol as to a local engine; each call becomes a request to one host's agent
(`hostwire.py`), or to every live host for listings and removals.

- prepare: the validated function folder goes to BUCKET_ARTIFACTS (replicated like the registry), then every live
  host builds it for its own engine at once; a host that missed it (down, or joined later) builds it when it is first
  asked to start that version. The version fails only when no host could build it.
- start: `placement.choose_host` picks the host (spread, then load, within each host's capacity); a host that
  cannot start it is skipped for the next. The handle names the host: `<host id>/<its handle>`.
- stop / is_alive: ask the handle's host; a host without a live lease has taken its instances with it (the reaper
  recycles their entries), so a stop there is done and nothing there is alive.
- A request to one host (prepare, start, stop) is given up as soon as that host's lease stops being live: a start
  may wait for a build (`AUBE_HOST_TIMEOUT`, 300 s), and a host killed meanwhile answers nothing (the server keeps
  a dead client's subscriptions until its own pings fail). The keeper waited that long before it rebuilt the pool
  elsewhere (measured on the rig: min_free not warm again 60 s after a host kill).
- instances / artifacts: the union over live hosts. A live host that does not answer fails the listing, so that
  reconcile never takes an instance it could not see for a missing one.
- watch_exits: every agent publishes the exits its engine reports on `aube.host.<id>.exited`.
"""

from __future__ import annotations

import logging
import tarfile
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import anyio
import msgspec
from nats.aio.client import Client as NATS
from nats.js.object_store import ObjectStore

from aube.controlplane import placement
from aube.controlplane.runtimes import hostwire
from aube.controlplane.runtimes.base import (
    Artifact,
    BuildLog,
    ExitListener,
    InstanceSpec,
    Inventory,
    RunningInstance,
    StartedInstance,
)
from aube.shared import buckets, bus, names
from aube.shared.errors import AubeError, BuildFailed, RuntimeFailure
from aube.shared.hostbook import HostBook
from aube.shared.registry import Registry
from aube.shared.schemas import HostLease, Manifest, RuntimeKind, decode
from aube.shared.settings import ControlPlaneSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
QUICK_TIMEOUT = 10.0  # stop, liveness, listings: a live agent answers these at once
LIVENESS_POLL = 0.5  # how often a long request to a host checks that the host still holds a live lease
MAX_START_ATTEMPTS = 3  # hosts tried for one instance before the start fails


async def open_host_buckets(
    nc: NATS, *, replicas: int = 1, resize: buckets.Resize = buckets.Resize.NEVER
) -> tuple[HostBook, ObjectStore]:
    """The hosts bucket and the versions' store, replicated like the registry (the control plane sets the count)."""
    js = nc.jetstream()
    book = await HostBook.open(js, replicas=replicas, resize=resize)
    store = await buckets.open_object_store(js, names.BUCKET_ARTIFACTS, replicas=replicas, resize=resize)
    return book, store


class HostsRuntime:
    def __init__(
        self,
        settings: ControlPlaneSettings,
        nc: NATS,
        registry: Registry,
        hosts: HostBook,
        artifacts: ObjectStore,
    ) -> None:
        self.kind: RuntimeKind = settings.host_runtime
        self.settings = settings
        self.nc = nc
        self.registry = registry
        self.hosts = hosts
        self.artifact_store = artifacts
        self.timeout = settings.host_timeout
        # Starts in flight, by instance id: the registry shows their host only once they are up.
        self._placing: dict[str, tuple[str, str]] = {}
        self._placement_lock = anyio.Lock()

    @classmethod
    async def connect(cls, settings: ControlPlaneSettings, nc: NATS, registry: Registry) -> HostsRuntime:
        hosts, artifacts = await open_host_buckets(nc, replicas=settings.kv_replicas, resize=buckets.Resize.EXACT)
        return cls(settings, nc, registry, hosts, artifacts)

    # -- hosts ---------------------------------------------------------------------------------------------

    async def live_hosts(self) -> list[HostLease]:
        now = time.time()
        return [
            e.record
            for e in await self.hosts.leases()
            if placement.live(e.record, now) and e.record.runtime == self.kind
        ]

    async def _ask(self, host_id: str, operation: str, body: msgspec.Struct, kind: type[T], timeout: float) -> T:
        """One request to one host; a long one is given up (RuntimeFailure) once the host no longer holds a live
        lease (a quick one's own timeout is short enough)."""
        subject = names.host_subject(host_id, operation)
        if timeout <= QUICK_TIMEOUT:
            return await bus.request(self.nc, subject, body, kind, timeout)
        answer: list[T] = []
        async with anyio.create_task_group() as tg:

            async def ask() -> None:
                answer.append(await bus.request(self.nc, subject, body, kind, timeout))
                tg.cancel_scope.cancel()

            tg.start_soon(ask)
            await self._until_dead(host_id)
            tg.cancel_scope.cancel()
        if not answer:
            raise RuntimeFailure(f"host {host_id} went away during {operation} (its lease is no longer live)")
        return answer[0]

    async def _until_dead(self, host_id: str) -> None:
        """Return once `host_id` is seen without a live lease (its own key read, not every lease: each long request
        polls); a lease that cannot be read proves nothing."""
        while True:
            await anyio.sleep(LIVENESS_POLL)
            try:
                lease = await self.hosts.lease(host_id)
            except Exception as e:  # NATS away: the request's own timeout still bounds the wait
                log.debug("liveness of %s unknown: %s", host_id, e)
                continue
            if lease is None or not placement.live(lease, time.time()):
                return

    async def _each_live_host(self, call: Callable[[str], Awaitable[T]]) -> dict[str, T | AubeError]:
        results: dict[str, T | AubeError] = {}

        async def one(host_id: str) -> None:
            try:
                results[host_id] = await call(host_id)
            except AubeError as e:
                results[host_id] = e

        # Read before the task group: a registry timeout (a NATS election) stays a plain error the caller maps to
        # "unavailable", not an ExceptionGroup answered as an internal error (the rig saw an upload fail so).
        hosts = await self.live_hosts()
        async with anyio.create_task_group() as tg:
            for host in hosts:
                tg.start_soon(one, host.host_id)
        return results

    # -- versions ------------------------------------------------------------------------------------------

    async def prepare(
        self, name: str, version: int, bundle_dir: Path, manifest: Manifest, owner: str, log_line: BuildLog
    ) -> str:
        await self._store_bundle(owner, name, version, bundle_dir)
        body = hostwire.PrepareOnHost(function=name, version=version, manifest=manifest, owner=owner)
        results = await self._each_live_host(
            lambda host_id: self._ask(host_id, hostwire.OP_PREPARE, body, hostwire.Prepared, self.timeout)
        )
        if not results:
            raise RuntimeFailure(f"no live host runs {self.kind} instances: start an agent (python -m aube.agent)")
        built = sorted(h for h, r in results.items() if isinstance(r, hostwire.Prepared))
        for host_id, result in sorted(results.items()):
            if isinstance(result, AubeError):
                log.warning("host %s could not prepare %s v%d: %s", host_id, name, version, result.message)
        if not built:
            first = next(r for _, r in sorted(results.items()) if isinstance(r, AubeError))
            raise BuildFailed(first.message) if isinstance(first, BuildFailed) else first
        prepared = results[built[0]]
        assert isinstance(prepared, hostwire.Prepared)
        for line in prepared.log:
            log_line(line)
        log_line(f"prepared on {len(built)} of {len(results)} host(s): {', '.join(built)}")
        return hostwire.artifact_ref(name, version)

    async def _store_bundle(self, owner: str, name: str, version: int, bundle_dir: Path) -> None:
        """The validated folder as a tar in BUCKET_ARTIFACTS, where hosts read it (now, or when they first start it)."""
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / "bundle.tar"

            def pack() -> None:
                with tarfile.open(archive, "w") as tar:
                    tar.add(bundle_dir, arcname=".")

            await anyio.to_thread.run_sync(pack)
            with archive.open("rb") as f:
                await self.artifact_store.put(hostwire.bundle_key(owner, name, version), f)

    async def remove_artifact(self, ref: str) -> None:
        parsed = hostwire.parse_artifact_ref(ref)
        if parsed is None:
            return
        owner = self.settings.owner
        body = hostwire.RemoveArtifactOnHost(owner=owner, ref=ref)
        await self._each_live_host(
            lambda host_id: self._ask(host_id, hostwire.OP_REMOVE_ARTIFACT, body, hostwire.Done, QUICK_TIMEOUT)
        )
        try:
            await self.artifact_store.delete(hostwire.bundle_key(owner, *parsed))
        except Exception as e:  # already gone: removal is idempotent
            log.debug("artifact bundle %s not deleted: %s", ref, e)

    async def artifacts(self, owner: str) -> list[Artifact]:
        listings = await self._listings(owner)
        found = {a.ref: a for listing in listings.values() for a in listing.artifacts}
        return sorted(found.values(), key=lambda a: a.ref)

    # -- instances -----------------------------------------------------------------------------------------

    async def start(self, spec: InstanceSpec) -> StartedInstance:
        tried: set[str] = set()
        last: AubeError | None = None
        for _ in range(MAX_START_ATTEMPTS):
            host_id = await self._place(spec, tried)
            if host_id is None:
                break
            tried.add(host_id)
            try:
                started = await self._ask(
                    host_id, hostwire.OP_START, hostwire.StartOnHost(spec=spec), hostwire.Started, self.timeout
                )
            except AubeError as e:
                log.warning("host %s could not start %s of %s: %s", host_id, spec.instance_id, spec.function, e)
                last = e
                continue
            finally:
                self._placing.pop(spec.instance_id, None)
            return msgspec.structs.replace(
                started.instance, handle=hostwire.host_handle(host_id, started.instance.handle), host=host_id
            )
        if last is not None:
            raise RuntimeFailure(f"no host could start an instance of {spec.function}: {last.message}")
        raise RuntimeFailure(f"no live host with room runs {self.kind} instances for {spec.function}")

    async def _place(self, spec: InstanceSpec, tried: set[str]) -> str | None:
        async with self._placement_lock:  # concurrent starts see each other's choices
            hosts = await self.live_hosts()
            placed = [(e.record.host, e.record.function) for e in await self.registry.instances() if e.record.host]
            placed += list(self._placing.values())
            host_id = placement.choose_host(
                hosts, placed, function=spec.function, runtime=self.kind, now=time.time(), exclude=tried
            )
            if host_id is not None:
                self._placing[spec.instance_id] = (host_id, spec.function)
            return host_id

    async def stop(self, handle: str) -> None:
        host_id, local = hostwire.split_handle(handle)
        if not host_id or host_id not in {h.host_id for h in await self.live_hosts()}:
            return
        await self._ask(host_id, hostwire.OP_STOP, hostwire.HandleOnHost(handle=local), hostwire.Done, self.timeout)

    async def is_alive(self, handle: str) -> bool:
        host_id, local = hostwire.split_handle(handle)
        if not host_id:
            return False
        try:
            answer = await self._ask(
                host_id, hostwire.OP_ALIVE, hostwire.HandleOnHost(handle=local), hostwire.Alive, QUICK_TIMEOUT
            )
        except AubeError:
            return False
        return answer.alive

    async def instances(self, owner: str) -> list[RunningInstance]:
        return (await self.inventory(owner)).instances

    async def inventory(self, owner: str) -> Inventory:
        """The live hosts' instances, covering exactly the hosts that answered.

        A live host that does not answer (its agent just started and is not subscribed yet, or is stuck) is left out
        of `hosts`, so reconcile passes over its entries; judging it dead is the reaper's, from its lease. Raising
        instead stopped the whole control plane at startup when one agent was slow."""
        listings = await self._listings(owner)
        return Inventory(
            instances=[
                msgspec.structs.replace(i, handle=hostwire.host_handle(host_id, i.handle))
                for host_id, listing in sorted(listings.items())
                for i in listing.instances
            ],
            hosts=frozenset(listings),
        )

    async def _listings(self, owner: str) -> dict[str, hostwire.Listing]:
        body = hostwire.ListOnHost(owner=owner)
        results = await self._each_live_host(
            lambda host_id: self._ask(host_id, hostwire.OP_LIST, body, hostwire.Listing, QUICK_TIMEOUT)
        )
        for host_id, result in sorted(results.items()):
            if isinstance(result, AubeError):
                log.warning("host %s left out of this listing: %s", host_id, result.message)
        return {h: r for h, r in results.items() if isinstance(r, hostwire.Listing)}

    async def watch_exits(self, owner: str, exited: ExitListener) -> None:
        subject = names.host_subject("*", names.HOST_EXITS)
        sub = await self.nc.subscribe(subject)
        try:
            async for msg in sub.messages:
                host_id = msg.subject.split(".")[2]
                try:
                    event = decode(msg.data, hostwire.Exited)
                except AubeError:
                    log.warning("unreadable exit event from host %s", host_id)
                    continue
                if event.owner == owner:
                    exited(hostwire.host_handle(host_id, event.handle))
        finally:
            with anyio.move_on_after(2, shield=True):
                await sub.unsubscribe()

    async def close(self) -> None:
        """Nothing of its own to close: the NATS connection is the service's."""
