"""SIGSTOP of one of two proxy replicas under `aube start` for longer than its lease, then SIGCONT (the
reliability issue's fault suite).

What a client sees during such a pause: the kernel still takes connections for the paused replica. SO_REUSEPORT
hands each new connection to one replica's listener by a hash of its addresses, whether that replica runs or not,
so with two replicas about half of the new connections complete their TCP handshake and then wait, unanswered (no
HTTP answer, no reset), in the paused replica's accept queue; once it resumes it serves those whose client still
waits. A client that gives up after an open timeout and connects again gets a new source port, and so a new pick:
retrying is how a client gets through during a pause.

The platform's part: the running replica's streams go on without an error and it serves every new client it gets;
the reaper judges the paused replica dead once its lease is past its TTL and recycles the instances it held (drained
and stopped, never handed to anyone else while the paused replica could still relay to them); on SIGCONT the replica
renews its lease and serves again; nothing stays busy without a stream; instances and registry agree.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import anyio
import pytest
from support import (
    REPO,
    AubeStart,
    RegistryTrail,
    Stream,
    Talk,
    accept_queue,
    nats_client,
    open_stream,
    running_instance_ids,
    streams_on_each,
    wait_http,
    wait_runtime_agrees,
)

from aube.shared.registry import Registry

pytestmark = pytest.mark.anyio

WHOAMI = REPO / "examples" / "whoami"
LEASE_TTL = 3.0  # seconds; short, so a pause past it keeps the test short
# A paused replica's lease is past its TTL about one TTL after its last renewal, and the reaper must then have seen
# it unchanged for one more TTL; then its instances are drained and stopped (a few seconds for a process).
RECYCLED_WITHIN = 2 * LEASE_TTL + 12
RETRY_OPEN_TIMEOUT = 3.0  # a retrying client's patience per attempt


async def lease_renewed_at(registry: Registry, proxy_id: str) -> float | None:
    return next((e.record.renewed_at for e in await registry.leases() if e.key == proxy_id), None)


async def retrying_client(url: str, port: int, pids: list[int], paused: int) -> tuple[int, Stream]:
    """Connect with a short open timeout until served; how many attempts it took, and the stream."""
    for attempt in range(1, 13):
        before = accept_queue(paused, port) or 0
        try:
            return attempt, await open_stream(url, port, pids, open_timeout=RETRY_OPEN_TIMEOUT)
        except TimeoutError:
            assert accept_queue(paused, port) == before + 1, "an attempt timed out, but not in the paused replica"
    raise AssertionError("twelve attempts all reached the paused replica")


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_sigstop_of_one_proxy_past_its_lease_spares_the_other_recycles_its_instances_and_it_recovers(
    platform, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # Relayed streams: the test tells a stream's replica by who holds its socket, and a paused replica's relayed
    # streams are the ones recycled (a handed-off stream outlives its proxy: test_handoff.py).
    env = platform.env(AUBE_LEASE_TTL=str(LEASE_TTL), AUBE_REAP_INTERVAL="0.5", AUBE_HANDOFF="off")
    start = AubeStart(tmp_path, env, proxies=2)
    try:
        await wait_http(start.proxy_port, timeout=60)
        await start.deploy("who", WHOAMI, "[scaling]\nmin_free = 3\nmax_instances = 30\n")
        port, url = start.proxy_port, f"ws://127.0.0.1:{start.proxy_port}/who"
        (paused,) = start.pids("proxy-1")
        (other,) = start.pids("proxy-2")
        pids = [paused, other]
        proxy_id = {paused: start.proxy_id(1), other: start.proxy_id(2)}
        trail = RegistryTrail()
        async with (
            nats_client(start.nats_url, **start.login()) as (_, registry),
            anyio.create_task_group() as tg,
        ):
            await tg.start(trail.follow, registry)
            streams = await streams_on_each(url, port, pids, each=2)
            held = {s.instance for s in streams if s.owner == paused}
            survivors = [s for s in streams if s.owner == other]
            with anyio.fail_after(60):  # a warm pool, so the running replica's newcomers need not wait for a start
                while sum(e.record.state == "free" for e in await registry.instances("who")) < 3:
                    await anyio.sleep(0.1)
            talk = Talk(survivors)
            tg.start_soon(talk.run)

            os.kill(paused, signal.SIGSTOP)
            paused_at = time.monotonic()
            arrivals: list[Stream] = []  # patient newcomers, in the order they were served

            async def patient() -> None:
                arrivals.append(await open_stream(url, port, pids, open_timeout=120))

            try:
                # New clients one at a time: the kernel gives each to one replica. The running one serves it; the
                # paused one's accept queue holds it, unanswered.
                queued = 0
                while len(arrivals) < 2 or queued < 2:
                    assert len(arrivals) + queued < 16, "the kernel kept choosing one replica"
                    served_before = len(arrivals)
                    tg.start_soon(patient)
                    with anyio.fail_after(20):
                        while len(arrivals) == served_before and accept_queue(paused, port) == queued:
                            await anyio.sleep(0.02)
                    queued = accept_queue(paused, port) or 0
                served_during = list(arrivals)
                assert [s.owner for s in served_during] == [other] * len(served_during)
                print(f"during the pause: {len(served_during)} new clients served, {queued} waiting unanswered")

                # A client that gives up and connects again is served by the running replica; each attempt that
                # timed out had waited in the paused replica's queue. Clients retry until one of them had to.
                retried: list[Stream] = []
                attempts = 1
                while attempts == 1:
                    assert len(retried) < 12, "the kernel kept choosing the running replica"
                    attempts, stream = await retrying_client(url, port, pids, paused)
                    assert stream.owner == other
                    retried.append(stream)
                print(f"{len(retried)} retrying clients served, the last at attempt {attempts}")

                # The reaper recycles what the paused replica held: out of the registry, and no longer running.
                with anyio.fail_after(max(1.0, RECYCLED_WITHIN - (time.monotonic() - paused_at))):
                    while held & (
                        {e.record.instance_id for e in await registry.instances("who")}
                        | await running_instance_ids(platform.owner, platform.runtime, platform.data_dir)
                    ):
                        await anyio.sleep(0.2)
                drained = max(at for i in held for at, state in trail.timeline(i) if state == "draining")
                gone = max(at for i in held for at, state in trail.timeline(i) if state == "gone")
                print(
                    f"the paused replica's {len(held)} instances drained {drained - paused_at:.2f}s and stopped "
                    f"{gone - paused_at:.2f}s into the pause"
                )
                assert gone - paused_at < RECYCLED_WITHIN
            finally:
                resumed_at, resumed_wall = time.monotonic(), time.time()
                os.kill(paused, signal.SIGCONT)

            # It renews its lease at once, its own streams end (their instances are gone), and the clients that
            # waited in its queue are served by it now.
            with anyio.fail_after(10):
                while ((await lease_renewed_at(registry, proxy_id[paused])) or 0.0) < resumed_wall:
                    await anyio.sleep(0.05)
            renewed_after = time.monotonic() - resumed_at
            print(f"lease renewed {renewed_after:.2f}s after SIGCONT")
            assert renewed_after < LEASE_TTL
            with anyio.fail_after(10):
                for stream in streams:
                    if stream.owner == paused:
                        await stream.conn.wait_closed()
            with anyio.fail_after(30):
                while len(arrivals) < len(served_during) + queued:
                    await anyio.sleep(0.05)
            served_after = arrivals[len(served_during) :]
            assert [s.owner for s in served_after] == [paused] * queued
            print(f"the {queued} waiting clients served {time.monotonic() - resumed_at:.2f}s after SIGCONT")

            # One lease TTL on, the busy entries are exactly the open streams, each claimed by its own replica.
            await anyio.sleep(LEASE_TTL + 1)
            rounds = await talk.stop()
            print(f"{rounds} rounds on the running replica's {len(survivors)} streams without an error")
            assert rounds >= 10
            open_streams = [*survivors, *arrivals, *retried]
            entries = await registry.instances("who")
            busy = {(e.record.instance_id, e.record.claimed_by) for e in entries if e.record.state == "busy"}
            assert busy == {(s.instance, proxy_id[s.owner]) for s in open_streams if s.owner is not None}

            # Exclusivity: what the paused replica held was drained and stopped, never freed or claimed again.
            for instance in held:
                history = trail.history(instance, since=paused_at)
                assert history[-1:] == ["gone"] and set(history) <= {"draining", "unhealthy", "gone"}, history

            for stream in open_streams:
                await stream.conn.close()
            await wait_runtime_agrees(registry, platform.owner, platform.runtime, platform.data_dir)
            tg.cancel_scope.cancel()
        assert start.interrupt() == 0
    finally:
        start.close()
