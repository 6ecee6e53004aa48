"""The reaper against a real nats-server: registry records written with the Registry API, the real `serve()`.

Stop requests are answered by `ControlPlaneStandIn`, a test observer subscribed on SUBJECT_STOP_INSTANCE that
records each request (with the entry's state when it arrived), deletes the entry as the control plane does once
an instance is gone, and replies. It stands in for the control plane, which is tested on its own.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import pytest
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.client import Client as NATS
from support import instance_ws, nats_client, zip_base64

from aube.controlplane.runtimes.process import ProcessRuntime
from aube.reaper.decisions import LEASE_MEMORY, Drain, Policy, Seen
from aube.reaper.decisions import plan as make_plan
from aube.reaper.service import Reaper, serve
from aube.shared import bus, kvread, names
from aube.shared.errors import RuntimeFailure
from aube.shared.natsserver import LocalNatsServer
from aube.shared.registry import Registry
from aube.shared.schemas import (
    FunctionRecord,
    InstanceRecord,
    Manifest,
    ProxyLease,
    ScaleIntent,
    ScaleReply,
    ScaleRequest,
    ScalingSection,
    StopInstanceReply,
    StopInstanceRequest,
    UploadReply,
    UploadRequest,
    decode,
    encode,
    error_reply,
)
from aube.shared.settings import ControlPlaneSettings, ReaperSettings

pytestmark = pytest.mark.anyio

INTERVAL = 0.2
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@dataclass
class Stop:
    request: StopInstanceRequest
    state: str | None  # the entry's state when the request arrived (None: no such entry)


class ControlPlaneStandIn:
    """Test observer in the control plane's place on SUBJECT_STOP_INSTANCE (see the module docstring).

    The first `fail_first` requests get an error reply and leave the entry as it is: a lost stop.
    """

    def __init__(self, nc: NATS, registry: Registry, *, fail_first: int = 0) -> None:
        self.nc = nc
        self.registry = registry
        self.fail_first = fail_first
        self.stops: list[Stop] = []

    def count(self) -> Counter[str]:
        return Counter(s.request.instance_id for s in self.stops)

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        sub = await self.nc.subscribe(names.SUBJECT_STOP_INSTANCE)
        await self.nc.flush()
        task_status.started()
        try:
            async for msg in sub.messages:
                req = decode(msg.data, StopInstanceRequest)
                entry = await self.registry.get_instance(names.instance_key(req.name, req.slot))
                self.stops.append(Stop(req, None if entry is None else entry.record.state))
                if len(self.stops) <= self.fail_first:
                    await msg.respond(error_reply(RuntimeFailure("stand-in: engine did not answer")))
                    continue
                if entry is not None and entry.record.instance_id == req.instance_id:
                    await self.registry.delete_instance(entry.key, entry.revision)
                await msg.respond(encode(StopInstanceReply(stopped=entry is not None)))
        finally:
            with anyio.move_on_after(2, shield=True):
                await sub.unsubscribe()


@dataclass
class World:
    server: LocalNatsServer
    nc: NATS
    registry: Registry
    tg: TaskGroup
    stand_in: ControlPlaneStandIn  # the test observer answering stop requests

    def settings(self, reaper_id: str = "r1") -> ReaperSettings:
        return ReaperSettings(
            nats_url=self.server.url,
            reaper_id=reaper_id,
            reap_interval=INTERVAL,
            lease_ttl=2.0,
            reaper_operator_port=0,  # a free port: several reapers here, and a platform on this machine may hold 9092
        )

    async def start_reaper(self, reaper_id: str = "r1") -> None:
        await self.tg.start(lambda task_status: serve(self.settings(reaper_id), task_status=task_status))


@asynccontextmanager
async def _world(server: LocalNatsServer, *, fail_first: int = 0) -> AsyncIterator[World]:
    nc = await nats.connect(server.url)
    try:
        registry = await Registry.open(nc.jetstream())
        async with anyio.create_task_group() as tg:
            cp = ControlPlaneStandIn(nc, registry, fail_first=fail_first)
            await tg.start(cp.serve)
            yield World(server, nc, registry, tg, cp)
            tg.cancel_scope.cancel()
    finally:
        await nc.close()


@pytest.fixture
async def world(nats_server: LocalNatsServer) -> AsyncIterator[World]:
    async with _world(nats_server) as p:
        yield p


def function(name: str, *, version: int = 1, min_free: int = 1, idle_timeout: float = 1.0) -> FunctionRecord:
    now = time.time()
    return FunctionRecord(
        name=name,
        version=version,
        manifest=Manifest(scaling=ScalingSection(min_free=min_free, idle_timeout=idle_timeout)),
        artifact="unused",
        runtime="process",
        created_at=now,
        updated_at=now,
    )


def instance(name: str, slot: int, *, state: str = "free", version: int = 1, **kw: object) -> InstanceRecord:
    fields: dict[str, object] = {
        "function": name,
        "slot": slot,
        "instance_id": f"{name}-{slot}",
        "version": version,
        "state": state,
        "runtime": "process",
        "owner": "test",
        "created_at": time.time() - 1000,
        **kw,
    }
    return msgspec.convert(fields, InstanceRecord)


async def put(registry: Registry, *records: FunctionRecord | InstanceRecord | ProxyLease) -> None:
    for r in records:
        if isinstance(r, FunctionRecord):
            assert await registry.put_function(r, None) is not None
        elif isinstance(r, InstanceRecord):
            assert await registry.create_instance(r) is not None
        else:
            await registry.put_lease(r)


async def until(cond: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    with anyio.fail_after(timeout):
        while not await cond():
            await anyio.sleep(0.05)


async def states(registry: Registry) -> dict[str, str]:
    return {e.key: e.record.state for e in await registry.instances()}


async def test_idle_free_instances_are_drained_then_stopped_keeping_the_most_recent(world: World) -> None:
    now = time.time()
    reg = world.registry
    await put(
        reg,
        function("echo", min_free=1, idle_timeout=1.0),
        instance("echo", 1, last_used=now - 30),
        instance("echo", 2, last_used=now - 10),  # the most recently used: kept for min_free
        instance("echo", 3, last_used=now - 20),
        function("warm", min_free=0, idle_timeout=3600.0),
        instance("warm", 1, last_used=now - 10),  # idle, but not for this function's idle_timeout
    )
    await world.start_reaper()

    await until(lambda: _n(world, 2))
    # The CAS came first: each stop request found its entry already draining.
    assert [(s.request.instance_id, s.state, s.request.reason) for s in sorted(world.stand_in.stops, key=_id)] == [
        ("echo-1", "draining", "idle"),
        ("echo-3", "draining", "idle"),
    ]
    await anyio.sleep(5 * INTERVAL)
    assert world.stand_in.count() == {"echo-1": 1, "echo-3": 1}
    assert await states(reg) == {"echo.2": "free", "warm.1": "free"}


async def test_old_version_and_retired_free_instances_are_reaped_at_once(world: World) -> None:
    now = time.time()
    await put(
        world.registry,
        function("up", version=2, min_free=2, idle_timeout=3600.0),
        instance("up", 1, version=1, last_used=now),
        instance("up", 2, version=2, retire=True, last_used=now),
        instance("up", 3, version=2, last_used=now),
    )
    await world.start_reaper()
    await until(lambda: _n(world, 2))
    assert sorted((s.request.instance_id, s.request.reason) for s in world.stand_in.stops) == [
        ("up-1", "old_version"),
        ("up-2", "retired"),
    ]
    assert await states(world.registry) == {"up.3": "free"}


async def test_min_free_zero_scales_to_zero(world: World) -> None:
    now = time.time()
    await put(
        world.registry,
        function("zero", min_free=0, idle_timeout=1.0),
        *(instance("zero", s, last_used=now - 5) for s in range(1, 4)),
    )
    await world.start_reaper()
    await until(lambda: _empty(world.registry))
    assert world.stand_in.count() == {"zero-1": 1, "zero-2": 1, "zero-3": 1}


async def test_busy_instances_of_live_proxies_never_change(world: World) -> None:
    now = time.time()
    reg = world.registry
    # Everything about these busy entries says "reap", except that a live proxy holds them.
    await put(
        reg,
        function("busy", version=2, min_free=0, idle_timeout=0.0),
        ProxyLease(proxy_id="p-live", started_at=now, renewed_at=now, ttl=3600),
        instance("busy", 1, state="busy", claimed_by="p-live", claimed_at=now - 1000, last_used=now - 1000),
        instance("busy", 2, state="busy", version=1, retire=True, claimed_by="p-live", claimed_at=now - 1000),
        function("canary", min_free=0, idle_timeout=0.0),
        instance("canary", 1, last_used=now - 5),
    )
    before = {e.key: e.revision for e in await reg.instances("busy")}
    await world.start_reaper()

    await until(lambda: _n(world, 1))  # the canary shows that passes run
    await anyio.sleep(5 * INTERVAL)
    assert {e.key: e.revision for e in await reg.instances("busy")} == before
    assert world.stand_in.count() == {"canary-1": 1}


async def test_a_claim_made_after_the_decision_wins_and_the_reaper_does_nothing(world: World) -> None:
    now = time.time()
    reg = world.registry
    await put(reg, function("race", min_free=0, idle_timeout=1.0), instance("race", 1, last_used=now - 10))
    reaper = Reaper(world.nc, reg, Policy(lease_grace=2.0))

    decided = make_plan(await reaper.snapshot(), {}, time.time(), reaper.policy)
    assert [a.entry.key for a in decided.actions if isinstance(a, Drain)] == ["race.1"]
    # A proxy claims the instance between the reaper's decision and its action.
    entry = await reg.get_instance("race.1")
    assert entry is not None
    claimed = msgspec.structs.replace(entry.record, state="busy", claimed_by="p1", claimed_at=time.time())
    assert await reg.update_instance(entry.revision, claimed) is not None

    await reaper.act(decided.actions)
    after = await reg.get_instance("race.1")
    assert after is not None
    assert after.record == claimed
    await anyio.sleep(3 * INTERVAL)  # a stop request would have arrived by now
    assert world.stand_in.stops == []


async def test_two_reapers_send_exactly_one_stop_request_per_instance(world: World) -> None:
    now = time.time()
    count = 12
    await put(
        world.registry,
        function("twin", min_free=0, idle_timeout=1.0),
        *(instance("twin", s, last_used=now - 10) for s in range(count)),
    )
    async with anyio.create_task_group() as tg:
        # Both start before either has acted, so they decide on the same snapshot and race every CAS.
        tg.start_soon(world.start_reaper, "r1")
        tg.start_soon(world.start_reaper, "r2")
    await until(lambda: _empty(world.registry))
    await anyio.sleep(5 * INTERVAL)
    assert world.stand_in.count() == {f"twin-{s}": 1 for s in range(count)}
    assert {s.state for s in world.stand_in.stops} == {"draining"}


async def test_expired_lease_is_deleted_and_its_busy_instances_recycled(world: World) -> None:
    now = time.time()
    reg = world.registry
    await put(
        reg,
        function("fn", min_free=5, idle_timeout=3600),
        ProxyLease(proxy_id="p-dead", started_at=now - 500, renewed_at=now - 100, ttl=6),
        ProxyLease(proxy_id="p-live", started_at=now - 500, renewed_at=now, ttl=3600),
        instance("fn", 1, state="busy", claimed_by="p-dead", claimed_at=now - 200),
        instance("fn", 2, state="busy", claimed_by="p-dead", claimed_at=now - 200),
        instance("fn", 3, state="busy", claimed_by="p-live", claimed_at=now - 200),
        # Claimed by a proxy whose lease is not written yet: within the grace, not judged.
        instance("fn", 4, state="busy", claimed_by="p-new", claimed_at=now + 3600),
    )
    await world.start_reaper()

    await until(lambda: _n(world, 2))
    assert sorted((s.request.instance_id, s.state, s.request.reason) for s in world.stand_in.stops) == [
        ("fn-1", "draining", "dead_proxy"),
        ("fn-2", "draining", "dead_proxy"),
    ]
    assert [lease.key for lease in await reg.leases()] == ["p-live"]
    await anyio.sleep(5 * INTERVAL)
    assert await states(reg) == {"fn.3": "busy", "fn.4": "busy"}


async def test_an_older_proxys_scale_intent_in_the_leases_bucket_is_deleted_and_touches_nothing(world: World) -> None:
    """Upgrade: proxies before the scale-intents bucket kept each intent in the leases bucket as a fake lease. One left
    behind is a lease nobody renews and that holds no claims: the reaper deletes it, and nothing else changes."""
    now = time.time()
    reg = world.registry
    # Byte for byte what such a proxy wrote (ttl = its cooldown, the asking proxy in `address`).
    legacy = f'{{"proxy_id":"scale-intent.fn","started_at":{now},"renewed_at":{now},"ttl":2.0,"address":"proxy-old"}}'
    await reg.leases_kv.put("scale-intent.fn", legacy.encode())
    await put(
        reg,
        function("fn", min_free=5, idle_timeout=3600),
        ProxyLease(proxy_id="p-live", started_at=now, renewed_at=now, ttl=3600),
        instance("fn", 1, state="busy", claimed_by="p-live", claimed_at=now - 200),
        instance("fn", 2),
    )
    await world.start_reaper()

    async def only_live_left() -> bool:  # in the bucket itself, not only in what Registry.leases() trusts
        stored = await kvread.snapshot(reg.js, names.BUCKET_LEASES)
        return [e.key for e in stored if e.value is not None] == ["p-live"]

    await until(only_live_left)
    gone = time.time() - now
    print(f"legacy intent deleted after {gone:.1f}s")
    await anyio.sleep(5 * INTERVAL)
    assert await states(reg) == {"fn.1": "busy", "fn.2": "free"}
    assert world.stand_in.stops == []
    # The function's scale intent proper is in its own bucket, which the leftover never blocked.
    assert await reg.take_scale_intent(ScaleIntent(function="fn", proxy_id="p-live", asked_at=now, expires_at=now + 9))


async def test_after_an_outage_a_proxy_that_renews_keeps_its_streams(world: World) -> None:
    """Reliability finding 2: when NATS came back after 20 s, every lease looked expired by the clock and the reaper
    drained every busy instance at once, cutting streams that had survived the outage. Leases are judged on time
    the reaper watched them; a proxy renewing on reconnect keeps its claims."""
    now = time.time()
    reg = world.registry
    stale = ProxyLease(proxy_id="p-back", started_at=now - 500, renewed_at=now - 20, ttl=2)
    await put(reg, function("fn", min_free=0), stale, instance("fn", 1, state="busy", claimed_by="p-back"))
    await world.start_reaper()

    async def renew() -> None:  # the proxy, reconnected: renews at once, then every ttl/3
        while True:
            await reg.put_lease(msgspec.structs.replace(stale, renewed_at=time.time()))
            await anyio.sleep(stale.ttl / 3)

    async with anyio.create_task_group() as tg:
        tg.start_soon(renew)
        await anyio.sleep(4 * stale.ttl)
        tg.cancel_scope.cancel()
    assert await states(reg) == {"fn.1": "busy"}
    assert [lease.key for lease in await reg.leases()] == ["p-back"]
    assert world.stand_in.stops == []


async def test_a_renewed_lease_is_not_deleted(world: World) -> None:
    """Deleting a lease is a CAS on the revision it was judged at: a renewal in between keeps it."""
    now = time.time()
    reg = world.registry
    await reg.put_lease(ProxyLease(proxy_id="p-slow", started_at=now - 50, renewed_at=now - 100, ttl=6))
    reaper = Reaper(world.nc, reg, Policy(lease_grace=2.0))
    snapshot = await reaper.snapshot()
    # This reaper has watched the lease, unchanged, for longer than its ttl: it is judged dead.
    watched = {LEASE_MEMORY + le.key: Seen(revision=le.revision, since=now - 100) for le in snapshot.leases}
    decided = make_plan(snapshot, watched, time.time(), reaper.policy)
    assert len(decided.actions) == 1
    await reg.put_lease(ProxyLease(proxy_id="p-slow", started_at=now - 50, renewed_at=time.time(), ttl=6))
    await reaper.act(decided.actions)
    assert [lease.key for lease in await reg.leases()] == ["p-slow"]


async def test_a_failed_stop_request_leaves_the_entry_draining_and_the_reaper_keeps_running(
    nats_server: LocalNatsServer,
) -> None:
    """A lost stop is not the reaper's to send again: the owning control plane stops an entry left draining
    (tests/integration/test_controlplane.py covers that). The reaper asks once and goes on reaping."""
    async with _world(nats_server, fail_first=1) as world:
        now = time.time()
        await put(world.registry, function("lost", min_free=0), instance("lost", 1, last_used=now - 10))
        await world.start_reaper()

        await until(_states_are(world.registry, {"lost.1": "draining"}), timeout=15)
        await put(world.registry, instance("lost", 2, last_used=time.time() - 10))
        await until(_gone(world.registry, "lost.2"))
        await anyio.sleep(5 * INTERVAL)
        assert await states(world.registry) == {"lost.1": "draining"}
        assert world.stand_in.count() == {"lost-1": 1, "lost-2": 1}


async def test_python_m_aube_reaper_runs_from_the_environment(world: World, tmp_path: Path) -> None:
    now = time.time()
    await put(world.registry, function("cli", min_free=0), instance("cli", 1, last_used=now - 10))
    env = {
        **os.environ,
        "AUBE_NATS_URL": world.server.url,
        "AUBE_REAP_INTERVAL": str(INTERVAL),
        "AUBE_REAPER_ID": "from-env",
        "AUBE_REAPER_OPERATOR_PORT": "0",  # a free port: a platform on this machine may hold 9092
    }
    log_path = tmp_path / "reaper.log"
    with log_path.open("wb") as log_file:
        proc = await anyio.open_process(
            [sys.executable, "-m", "aube.reaper"], env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file
        )
        async with proc:
            try:
                await until(lambda: _empty(world.registry))
                assert world.stand_in.count() == {"cli-1": 1}
            finally:
                proc.send_signal(signal.SIGTERM)  # how `aube start` stops it
                with anyio.move_on_after(10):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
    err = log_path.read_text()
    assert proc.returncode == 0, err
    assert "reaping cli instance cli-1 (idle)" in err


def _id(s: Stop) -> str:
    return s.request.instance_id


async def _n(world: World, n: int) -> bool:
    return len(world.stand_in.stops) >= n


async def _empty(registry: Registry) -> bool:
    return not await registry.instances()


def _states_are(registry: Registry, expected: dict[str, str]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await states(registry) == expected

    return check


def _gone(registry: Registry, key: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await registry.get_instance(key) is None

    return check


# -- with the real control plane -----------------------------------------------------------------------------


@pytest.fixture
def runtime_kind() -> str:
    """The reaper's behaviour does not depend on the runtime: the lean process runtime is enough here."""
    return "process"


async def test_real_control_plane_stops_reaped_instances_and_min_free_stays_warm(
    platform: Any,
    tmp_path: Path,  # tests/conftest.py's Platform: the services as real processes
) -> None:
    folder = tmp_path / "idle"
    shutil.copytree(EXAMPLES / "reverse-async", folder)
    (folder / "aube.toml").write_text("[scaling]\nmin_free = 1\nidle_timeout = 1\n")
    await platform.start_controlplane()
    async with nats_client(platform.nats_url) as (nc, registry):
        body = UploadRequest(name="idle", zip=zip_base64(folder))
        await bus.request(nc, names.SUBJECT_UPLOAD, body, UploadReply, 300)
        scaled = await bus.request(nc, names.SUBJECT_SCALE, ScaleRequest(name="idle", count=2), ScaleReply, 120)
        assert scaled.total == 3
        platform.start("aube.reaper", AUBE_REAP_INTERVAL=str(INTERVAL))

        async def one_left() -> bool:
            return len(await registry.instances("idle")) == 1

        await until(one_left, timeout=60)
        (kept,) = await registry.instances("idle")
        assert kept.record.state == "free"
        # The control plane really stopped the other two: only the kept instance still runs.
        runtime = ProcessRuntime(ControlPlaneSettings(owner=platform.owner, data_dir=platform.data_dir))
        try:
            running = await runtime.instances(platform.owner)
        finally:
            await runtime.close()
        assert [r.instance_id for r in running] == [kept.record.instance_id]
        # ...and it still serves.
        async with instance_ws(kept.record.address, "/x", secret=kept.record.secret, open_timeout=30) as ws:
            await ws.send("warm")
            assert await ws.recv() == "mraw"
    reaper_log = platform.services[-1].log_text()
    assert reaper_log.count("reaping idle instance") == 2, reaper_log
