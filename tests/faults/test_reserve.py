"""Instances a proxy keeps claimed between streams (proxy/reserve.py, issue 11's reservations).

After a stream, the proxy keeps its instance for `AUBE_RESERVE_SECONDS` and hands it to its next client with no
registry write, so a registry between leaders (nats-server waits 4-9 s before it elects another) does not stop
that client. Real nats-server (stopped with SIGSTOP), control plane, proxies and process instances; whoami reports
which instance answered and how many streams it carries.
"""

from __future__ import annotations

import os
import signal

import anyio
import pytest
from support import deploy_whoami, exchange, nats_client, whoami_stream

from aube.shared.registry import Registry

pytestmark = pytest.mark.anyio

# Relayed here (AUBE_HANDOFF=off); kept after a handed-off stream too, its claim unflagged: tests/integration/
# test_handoff.py (test_the_next_client_is_handed_the_kept_instance_with_no_claim_write).

ONE = "[scaling]\nmin_free = 1\nmax_instances = 1\n"


async def state_of(registry: Registry, instance_id: str) -> str | None:
    found = [e.record.state for e in await registry.instances("who") if e.record.instance_id == instance_id]
    return found[0] if found else None


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_the_next_client_is_served_by_the_kept_instance_while_the_registry_is_stopped(
    platform, nats_server
) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane()
    port, _ = await platform.start_proxy(AUBE_HANDOFF="off")
    async with nats_client(platform.nats_url) as (nc, registry):
        await deploy_whoami(nc, ONE)
        async with whoami_stream(port, timeout=15) as ws:
            first = (await exchange(ws, "hi"))["instance"]
        await anyio.sleep(0.3)  # the proxy asks the instance whether its handler returned, then keeps it
        assert await state_of(registry, str(first)) == "busy"  # still this replica's claim: nobody else's
        os.kill(nats_server.process.pid, signal.SIGSTOP)
        try:
            with anyio.fail_after(5):
                async with whoami_stream(port, timeout=5) as ws:
                    reply = await exchange(ws, "hi")
        finally:
            os.kill(nats_server.process.pid, signal.SIGCONT)
        assert reply["instance"] == first and reply["streams"] == 1
        # Not taken again: released within the reserve's 2 s (and a poll).
        with anyio.fail_after(10):
            while await state_of(registry, str(first)) != "free":
                await anyio.sleep(0.1)


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_another_replica_gets_the_instance_only_once_the_keeper_released_it(platform) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane()
    keeper, _ = await platform.start_proxy(AUBE_RESERVE_SECONDS="3", AUBE_HANDOFF="off")
    other, _ = await platform.start_proxy(AUBE_HANDOFF="off")
    async with nats_client(platform.nats_url) as (nc, _registry):
        await deploy_whoami(nc, ONE)
        async with whoami_stream(keeper, timeout=15) as ws:
            first = (await exchange(ws, "hi"))["instance"]
        left = anyio.current_time()
        async with whoami_stream(other, timeout=15) as ws:
            waited = anyio.current_time() - left
            reply = await exchange(ws, "hi")
        print(f"the other replica's client was served {waited:.2f}s after the keeper's client left")
        assert reply["instance"] == first and reply["streams"] == 1
        assert waited > 2.5  # the keeper held it for its 3 s; nobody else could claim it meanwhile


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_a_kept_instance_of_an_older_version_is_not_handed_out(platform) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane()
    port, _ = await platform.start_proxy(AUBE_RESERVE_SECONDS="120", AUBE_HANDOFF="off")
    async with nats_client(platform.nats_url) as (nc, registry):
        await deploy_whoami(nc, "[scaling]\nmin_free = 1\nmax_instances = 3\n")
        async with whoami_stream(port, timeout=15) as ws:
            old = (await exchange(ws, "hi"))["instance"]
        await anyio.sleep(0.3)
        assert await state_of(registry, str(old)) == "busy"  # kept
        await deploy_whoami(nc, "[scaling]\nmin_free = 1\nmax_instances = 3\n# v2\n")
        await anyio.sleep(0.5)  # the proxy's view follows the new record
        async with whoami_stream(port, timeout=15) as ws:
            new = (await exchange(ws, "hi"))["instance"]
        assert new != old
        # The old one was released when it could not be handed out (retired: drained and stopped).
        with anyio.fail_after(15):
            while await state_of(registry, str(old)) is not None:
                await anyio.sleep(0.1)


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_a_stopping_proxy_releases_what_it_kept(platform) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane()
    port, proxy = await platform.start_proxy(AUBE_RESERVE_SECONDS="120", AUBE_HANDOFF="off")
    async with nats_client(platform.nats_url) as (nc, registry):
        await deploy_whoami(nc, ONE)
        async with whoami_stream(port, timeout=15) as ws:
            first = (await exchange(ws, "hi"))["instance"]
        await anyio.sleep(0.3)
        assert await state_of(registry, str(first)) == "busy"
        proxy.proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(15):
            while await state_of(registry, str(first)) != "free":
                await anyio.sleep(0.1)
