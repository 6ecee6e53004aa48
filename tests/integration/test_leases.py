"""A proxy's lease against a real nats-server: renewed on its tick, and at once when NATS comes back."""

from __future__ import annotations

import time

import anyio
import nats
import pytest

from aube.proxy.leases import RenewSignal, keep_lease
from aube.shared.natsserver import LocalNatsServer
from aube.shared.registry import Registry

pytestmark = pytest.mark.anyio


async def test_a_reconnect_renews_the_lease_at_once(nats_server: LocalNatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        registry = await Registry.open(nc.jetstream())
        renew_now = RenewSignal()
        ttl = 30.0  # the tick (ttl/3 = 10 s) is far away: only the signal can renew within the test
        async with anyio.create_task_group() as tg:
            await tg.start(lambda **kw: keep_lease(registry, "p1", ttl, renew_now=renew_now, **kw))
            (first,) = await registry.leases()
            renew_now.set()  # what the proxy's reconnected callback does
            with anyio.fail_after(5):
                while (await registry.leases())[0].revision == first.revision:
                    await anyio.sleep(0.05)
            (renewed,) = await registry.leases()
            assert renewed.record.renewed_at > first.record.renewed_at
            assert renewed.record.renewed_at > time.time() - 5
            tg.cancel_scope.cancel()
        assert await registry.leases() == []  # deleted on the way out
    finally:
        await nc.close()
