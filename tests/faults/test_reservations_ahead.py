"""Reservations ahead of demand (`AUBE_RESERVE`, proxy/reserve.py, docs/reservations.md).

Each proxy replica claims a few free instances per function before any client asks and serves its next clients from
them with no NATS round trip. A reservation is an ordinary claim: the reaper recycles a dead replica's reservations
like its claims, and a new version or a delete takes them back at once. Real nats-server (stopped with SIGSTOP),
control plane, reaper, proxies (killed with SIGKILL) and process instances; whoami reports which instance answered
and how many streams it carries. Each test prints what it measured (pytest -s shows it).
"""

from __future__ import annotations

import os
import signal
import statistics
import time
import urllib.request

import anyio
import pytest
from support import deploy_whoami, exchange, nats_client, whoami_stream

from aube.shared import names
from aube.shared.bus import request
from aube.shared.registry import InstanceEntry, Registry
from aube.shared.schemas import DeleteReply, DeleteRequest

pytestmark = pytest.mark.anyio

SCALING = "[scaling]\nmin_free = 1\nmax_instances = 4\n"


async def reserved_by(registry: Registry, proxy_id: str, count: int, timeout: float = 30) -> list[InstanceEntry]:
    """Wait until `proxy_id` holds `count` claims of who; those claims."""
    with anyio.fail_after(timeout):
        while True:
            held = [e for e in await registry.instances("who") if e.record.claimed_by == proxy_id]
            if len(held) >= count:
                return held
            await anyio.sleep(0.1)


async def instance_ids(registry: Registry) -> set[str]:
    return {e.record.instance_id for e in await registry.instances("who")}


def metric(operator_port: str, line: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{operator_port}/_aube/metrics", timeout=5) as r:
        text = r.read().decode()
    found = [int(float(m.rsplit(" ", 1)[1])) for m in text.splitlines() if m.startswith(line + " ")]
    return found[0] if found else 0


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_a_client_is_served_from_a_reservation_while_nats_is_stopped(platform, nats_server) -> None:  # type: ignore[no-untyped-def]
    """No client has connected yet: the instance that serves it was reserved ahead of demand, so its setup needs no
    NATS round trip. A long lease keeps the replica's lease fresh (reserve.py hands out only under a fresh lease)."""
    await platform.start_controlplane()
    port, proxy = await platform.start_proxy(AUBE_RESERVE="1", AUBE_LEASE_TTL="30", AUBE_HANDOFF="off")
    proxy_id = proxy.env["AUBE_PROXY_ID"]
    async with nats_client(platform.nats_url) as (nc, registry):
        await deploy_whoami(nc, SCALING)
        (held,) = await reserved_by(registry, proxy_id, 1)
        # The keeper counts the reservation busy and tops the warm pool back up to min_free: one free besides it.
        with anyio.fail_after(60):
            while not any(e.record.state == "free" for e in await registry.instances("who")):
                await anyio.sleep(0.1)
        await anyio.sleep(0.5)  # the replica's view has its own claim
        os.kill(nats_server.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with anyio.fail_after(5):
                async with whoami_stream(port, timeout=5) as ws:
                    setup = time.monotonic() - started
                    reply = await exchange(ws, "hi")
        finally:
            os.kill(nats_server.process.pid, signal.SIGCONT)
        print(f"served from the reservation in {setup * 1000:.1f} ms while nats-server was stopped")
        assert reply["instance"] == held.record.instance_id and reply["streams"] == 1
        assert metric(proxy.env["AUBE_OPERATOR_PORT"], 'aube_claims_total{function="who",result="reserved"}') == 1


async def _setup_times(port: int, clients: int) -> tuple[list[float], set[str]]:
    times: list[float] = []
    served: set[str] = set()
    for _ in range(clients):
        started = time.monotonic()
        async with whoami_stream(port) as ws:
            times.append(time.monotonic() - started)
            served.add(str((await exchange(ws, "hi"))["instance"]))
        await anyio.sleep(0.3)  # the instance's handler returns; then it is reserved again (or released)
    return times, served


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_setup_time_with_and_without_a_reservation(platform) -> None:  # type: ignore[no-untyped-def]
    """Sequential clients on two replicas, neither keeping instances after a stream (AUBE_RESERVE_SECONDS=0): one
    holds a reservation (served with no registry write), the other claims by compare-and-set each time."""
    await platform.start_controlplane()
    reserving, reserving_proxy = await platform.start_proxy(
        AUBE_RESERVE="1", AUBE_RESERVE_SECONDS="0", AUBE_HANDOFF="off"
    )
    claiming, _ = await platform.start_proxy(AUBE_RESERVE="0", AUBE_RESERVE_SECONDS="0", AUBE_HANDOFF="off")
    async with nats_client(platform.nats_url) as (nc, registry):
        # Room below the cap (no reservation is held at max_instances): the claiming replica's scale asks add some.
        await deploy_whoami(nc, "[scaling]\nmin_free = 2\nmax_instances = 8\n")
        await reserved_by(registry, reserving_proxy.env["AUBE_PROXY_ID"], 1)
        with anyio.fail_after(60):
            while sum(e.record.state == "free" for e in await registry.instances("who")) < 2:
                await anyio.sleep(0.1)
        await _setup_times(claiming, 3)  # warm up both paths
        await _setup_times(reserving, 3)
        without, _ = await _setup_times(claiming, 25)
        with_reservation, _ = await _setup_times(reserving, 25)
    reserved = metric(reserving_proxy.env["AUBE_OPERATOR_PORT"], 'aube_claims_total{function="who",result="reserved"}')
    print(
        f"setup median: {statistics.median(with_reservation) * 1000:.1f} ms with a reservation, "
        f"{statistics.median(without) * 1000:.1f} ms without (claimed); {reserved} of 28 served reserved"
    )
    assert reserved >= 25  # every measured client of the reserving replica was served from its reservation


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_kill_9_of_the_proxy_holding_reservations_recycles_them(platform) -> None:  # type: ignore[no-untyped-def]
    lease_ttl = 3.0
    await platform.start_controlplane()
    platform.start("aube.reaper", AUBE_REAP_INTERVAL="0.5", AUBE_LEASE_TTL=str(lease_ttl))
    _, victim = await platform.start_proxy(AUBE_RESERVE="2", AUBE_LEASE_TTL=str(lease_ttl), AUBE_HANDOFF="off")
    async with nats_client(platform.nats_url) as (nc, registry):
        await deploy_whoami(nc, SCALING)
        held = await reserved_by(registry, victim.env["AUBE_PROXY_ID"], 2)
        ids = {e.record.instance_id for e in held}
        await anyio.sleep(1.0)  # a stable state: reservations held, the keeper's top-up started
        killed_at = time.monotonic()
        victim.kill9()
        with anyio.fail_after(4 * lease_ttl + 15):
            while ids & await instance_ids(registry):
                await anyio.sleep(0.1)
        recycled = time.monotonic() - killed_at
        print(f"a dead proxy's reservations were recycled {recycled:.2f}s after kill -9 (lease ttl {lease_ttl:.0f}s)")
        # The warm pool is whole again, and another replica serves from it.
        port, _ = await platform.start_proxy(AUBE_HANDOFF="off")
        async with whoami_stream(port) as ws:
            reply = await exchange(ws, "hi")
        assert reply["instance"] not in ids and reply["streams"] == 1


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_no_instance_carries_two_streams_under_bursts(platform) -> None:  # type: ignore[no-untyped-def]
    """Two replicas reserving (and keeping after streams) while bursts of clients, more than the instances, arrive
    at both: every reply says its instance carries exactly one stream."""
    await platform.start_controlplane()
    replicas = [
        await platform.start_proxy(
            AUBE_RESERVE="2", AUBE_RESERVE_SECONDS="0.5", AUBE_HANDOFF="off", AUBE_CLAIM_TIMEOUT="60"
        )
        for _ in range(2)
    ]
    async with nats_client(platform.nats_url) as (nc, registry):
        await deploy_whoami(nc, "[scaling]\nmin_free = 2\nmax_instances = 6\n")
        for _, proxy in replicas:
            await reserved_by(registry, proxy.env["AUBE_PROXY_ID"], 2)
        replies: list[dict[str, object]] = []

        async def client(port: int) -> None:
            async with whoami_stream(port, timeout=90) as ws:
                for n in range(3):
                    replies.append(await exchange(ws, str(n)))
                    await anyio.sleep(0.05)

        for _ in range(3):
            async with anyio.create_task_group() as tg:
                for i in range(16):
                    tg.start_soon(client, replicas[i % 2][0])
            await anyio.sleep(0.2)
    reserved = sum(
        metric(proxy.env["AUBE_OPERATOR_PORT"], 'aube_claims_total{function="who",result="reserved"}')
        for _, proxy in replicas
    )
    print(f"{len(replies)} replies from {len({r['instance'] for r in replies})} instances; {reserved} clients reserved")
    assert len(replies) == 3 * 16 * 3
    assert all(r["streams"] == 1 for r in replies), [r for r in replies if r["streams"] != 1]
    assert reserved >= 4  # the bursts did take reservations


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_a_new_version_and_a_delete_take_reservations_back(platform) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane()
    _, proxy = await platform.start_proxy(AUBE_RESERVE="1", AUBE_HANDOFF="off")
    proxy_id = proxy.env["AUBE_PROXY_ID"]
    async with nats_client(platform.nats_url) as (nc, registry):
        await deploy_whoami(nc, SCALING)
        (old,) = await reserved_by(registry, proxy_id, 1)
        uploaded = await deploy_whoami(nc, SCALING + "# v2\n")
        # The old version's reservation is given back and retired (drained, stopped) without any client; the
        # replica reserves one of the new version instead.
        started = time.monotonic()
        with anyio.fail_after(20):
            while old.record.instance_id in await instance_ids(registry):
                await anyio.sleep(0.1)
        print(f"the old version's reservation was stopped {time.monotonic() - started:.2f}s after the upload's reply")
        with anyio.fail_after(30):
            while True:
                held = [e for e in await reserved_by(registry, proxy_id, 1) if e.record.version == uploaded.version]
                if held:
                    break
                await anyio.sleep(0.1)
        # A delete with a 30 s grace for streams: the reservation streams nothing, so it is given back and the
        # function is gone long before the grace ends.
        started = time.monotonic()
        await request(nc, names.SUBJECT_DELETE, DeleteRequest(name="who", grace=30.0), DeleteReply, 30)
        with anyio.fail_after(15):
            while await registry.instances("who"):
                await anyio.sleep(0.1)
        print(f"every instance of the deleted function was gone {time.monotonic() - started:.2f}s after the delete")
