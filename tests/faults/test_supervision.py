"""Faults under `aube start`: real processes killed with real signals (the reliability issue).

A crashed service is restarted while the rest keep running: a proxy replica (the other replica's streams are not
cut), the control plane (its startup reconcile adopts what runs: open streams and the warm pool are kept) and the
reaper (idle reaping goes on). Each test prints what it measured (pytest -s shows it).
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from pathlib import Path

import anyio
import pytest
from nats.aio.client import Client as NATS
from support import (
    REPO,
    AubeStart,
    RegistryTrail,
    Talk,
    exchange,
    listens,
    nats_client,
    open_stream,
    streams_on_each,
    wait_http,
    wait_runtime_agrees,
)
from websockets.exceptions import ConnectionClosed

from aube.shared import names
from aube.shared.bus import request
from aube.shared.errors import ServiceUnavailable
from aube.shared.registry import Registry
from aube.shared.schemas import ListReply, ListRequest

pytestmark = pytest.mark.anyio

WHOAMI = REPO / "examples" / "whoami"
RECONCILE_INTERVAL = 2.0  # the platform fixture's AUBE_RECONCILE_INTERVAL


async def busy_count(registry: Registry, name: str) -> int:
    return sum(e.record.state == "busy" for e in await registry.instances(name))


async def free_ids(registry: Registry, name: str, count: int, timeout: float = 60) -> set[str]:
    """Wait until `name` has `count` free instances (the warm pool); their ids."""
    with anyio.fail_after(timeout):
        while (
            len(found := {e.record.instance_id for e in await registry.instances(name) if e.record.state == "free"})
            < count
        ):
            await anyio.sleep(0.1)
    return found


async def controlplane_answers(nc: NATS, timeout: float = 60) -> None:
    with anyio.fail_after(timeout):
        while True:
            try:
                await request(nc, names.SUBJECT_LIST, ListRequest(), ListReply, 1.0)
                return
            except ServiceUnavailable:
                await anyio.sleep(0.05)


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_kill_9_of_one_proxy_spares_the_other_replicas_streams_and_it_serves_again(
    platform, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # Relayed: a handed-off stream outlives its proxy (tests/integration/test_handoff.py covers that case).
    start = AubeStart(tmp_path, platform.env(AUBE_HANDOFF="off"), proxies=2)
    try:
        await wait_http(start.proxy_port)
        await start.deploy("who", WHOAMI, "[scaling]\nmin_free = 4\nmax_instances = 20\n")
        url = f"ws://127.0.0.1:{start.proxy_port}/who"
        (victim,) = start.pids("proxy-1")
        streams = await streams_on_each(url, start.proxy_port, [victim, *start.pids("proxy-2")], each=3)
        survivors = [s for s in streams if s.owner != victim]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)

        # The other replica's streams carry on without an error; the killed replica's are gone.
        for round_ in range(10):
            for stream in survivors:
                await exchange(stream.conn, f"after-{round_}")
            await anyio.sleep(0.2)
        for stream in streams:
            if stream.owner == victim:
                with pytest.raises(ConnectionClosed):
                    await exchange(stream.conn, "x")

        # The platform stays up and proxy-1 serves again, as a new process on the port.
        with anyio.fail_after(30):
            while not listens(await start.started("proxy-1", 2), start.proxy_port):
                await anyio.sleep(0.05)
        back_after = time.monotonic() - killed_at
        print(f"proxy-1 serving again {back_after:.2f}s after kill -9")
        assert back_after < 5

        # Its former instances come back to the pool once its lease expires (TTL 6 s): within two TTLs.
        async with nats_client(start.nats_url, **start.login()) as (_, registry):
            with anyio.fail_after(2 * 6 + 8):
                while await busy_count(registry, "who") != len(survivors):
                    await anyio.sleep(0.2)
            print(f"former instances free again {time.monotonic() - killed_at:.2f}s after kill -9")
            assert time.monotonic() - killed_at < 2 * 6 + 2
        for stream in survivors:
            await exchange(stream.conn, "still here")
        for stream in streams:
            await stream.conn.close()
        assert start.interrupt() == 0
        assert "[aube] stopped" in start.output()
    finally:
        start.close()


async def test_kill_9_of_the_control_plane_cuts_no_stream_keeps_the_warm_pool_and_uploads_work_again(
    platform, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    start = AubeStart(tmp_path, platform.env(), proxies=1)
    try:
        await wait_http(start.proxy_port, timeout=60)
        await start.deploy("who", WHOAMI, "[scaling]\nmin_free = 2\nmax_instances = 10\n")
        url = f"ws://127.0.0.1:{start.proxy_port}/who"
        proxies = start.pids("proxy-1")
        trail = RegistryTrail()
        async with (
            nats_client(start.nats_url, **start.login()) as (nc, registry),
            anyio.create_task_group() as tg,
        ):
            await tg.start(trail.follow, registry)
            streams = [await open_stream(url, start.proxy_port, proxies) for _ in range(3)]
            warm = await free_ids(registry, "who", 2)
            await trail.quiet()  # the keeper and the proxy are done with their last writes
            talk = Talk(streams)
            tg.start_soon(talk.run)

            (first,) = start.pids("controlplane")
            killed_at = time.monotonic()
            os.kill(first, signal.SIGKILL)
            await start.started("controlplane", 2)
            await controlplane_answers(nc)
            print(f"control plane answering again {time.monotonic() - killed_at:.2f}s after kill -9")
            # Its startup reconcile and a few regular ones later, nothing it owns was stopped or even written: the
            # open streams talk on, and the warm pool is the same instances.
            await anyio.sleep(3 * RECONCILE_INTERVAL)
            for instance in [s.instance for s in streams] + sorted(warm):
                assert trail.history(instance, since=killed_at) == [], (instance, trail.history(instance))
            assert await free_ids(registry, "who", 2, timeout=1) == warm

            # An upload after the restart works, and its function serves.
            uploaded_at = time.monotonic()
            await start.deploy("again", WHOAMI, "[scaling]\nmin_free = 1\nmax_instances = 2\n")
            print(f"upload after the restart took {time.monotonic() - uploaded_at:.2f}s")
            fresh = await open_stream(f"ws://127.0.0.1:{start.proxy_port}/again", start.proxy_port, proxies)
            await fresh.conn.close()
            rounds = await talk.stop()
            print(f"{rounds} rounds on {len(streams)} streams without an error")
            assert rounds >= 10 and len(start.pids("controlplane")) == 2
            assert await busy_count(registry, "who") == len(streams)
            for stream in streams:
                await stream.conn.close()
            await wait_runtime_agrees(registry, platform.owner, platform.runtime, platform.data_dir)
            tg.cancel_scope.cancel()
        assert start.interrupt() == 0
    finally:
        start.close()


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_kill_9_of_the_reaper_cuts_no_stream_and_idle_reaping_goes_on(platform, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lease_ttl = 3.0
    env = platform.env(AUBE_LEASE_TTL=str(lease_ttl), AUBE_REAP_INTERVAL="0.5")
    start = AubeStart(tmp_path, env, proxies=1)
    try:
        await wait_http(start.proxy_port, timeout=60)
        await start.deploy("who", WHOAMI, "[scaling]\nmin_free = 1\nmax_instances = 10\nidle_timeout = 2\n")
        url = f"ws://127.0.0.1:{start.proxy_port}/who"
        proxies = start.pids("proxy-1")
        trail = RegistryTrail()
        async with (
            nats_client(start.nats_url, **start.login()) as (_, registry),
            anyio.create_task_group() as tg,
        ):
            await tg.start(trail.follow, registry)
            streams = [await open_stream(url, start.proxy_port, proxies) for _ in range(4)]
            await trail.quiet()  # the proxy's last write (a handed-off stream's flag) comes before the kill
            talk = Talk(streams)
            tg.start_soon(talk.run)

            (first,) = start.pids("reaper")
            killed_at = time.monotonic()
            os.kill(first, signal.SIGKILL)
            await start.started("reaper", 2)
            print(f"reaper restarted {time.monotonic() - killed_at:.2f}s after kill -9")
            log_after_restart = len(start.output())
            # The new reaper judges the proxy's lease afresh: two lease TTLs on, every stream still talks.
            await anyio.sleep(2 * lease_ttl + 1)
            rounds = await talk.stop()
            print(f"{rounds} rounds on {len(streams)} streams without an error")
            assert rounds >= 10

            # Idle reaping goes on: three streams end, and their instances, idle past the idle timeout and beyond
            # min_free (the most recently used one is kept), are drained and stopped by the restarted reaper.
            for stream in streams[:3]:
                await stream.conn.close()
            closed_at = time.monotonic()
            with anyio.fail_after(30):
                while sorted(e.record.state for e in await registry.instances("who")) != ["busy", "free"]:
                    await anyio.sleep(0.2)
            print(f"idle instances reaped {time.monotonic() - closed_at:.2f}s after their streams ended")
            (kept,) = [e.record.instance_id for e in await registry.instances("who") if e.record.state == "free"]
            reaped = [s.instance for s in streams[:3] if s.instance != kept]
            assert len(reaped) >= 2
            for instance in reaped:
                # The one proxy may keep it a moment after its stream (busy, claimed by that proxy still); then it
                # is free, drained and stopped, and nobody claims it again.
                history = trail.history(instance, since=killed_at)
                kept = list(itertools.takewhile(lambda state: state.startswith("busy:"), history))
                assert len(set(kept)) <= 1 and history[len(kept) :] == ["free", "draining", "gone"], history
            assert start.output()[log_after_restart:].count("reaping who instance") >= len(reaped)
            assert (await exchange(streams[3].conn, "last"))["instance"] == streams[3].instance
            await streams[3].conn.close()
            await wait_runtime_agrees(registry, platform.owner, platform.runtime, platform.data_dir)
            tg.cancel_scope.cancel()
        assert start.interrupt() == 0
    finally:
        start.close()
