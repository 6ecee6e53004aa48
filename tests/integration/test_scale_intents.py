"""Scale intents against a real nats-server: their own bucket, exactly one asker per window, expired ones taken over.

Each "proxy" here is its own NATS connection with its own Registry, as two proxy replicas are; several tasks per
proxy race at once, as a burst of waiting clients in one replica would without its local cooldown.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import anyio
import msgspec
import nats
import pytest

from aube.proxy import decisions
from aube.shared import kvread, names
from aube.shared.natsserver import LocalNatsServer
from aube.shared.registry import Registry
from aube.shared.schemas import ScaleIntent, encode

pytestmark = pytest.mark.anyio

WINDOW = 0.4
PROXIES = ("p1", "p2")
RACERS_PER_PROXY = 4


@pytest.fixture
async def registries(nats_server: LocalNatsServer) -> AsyncIterator[dict[str, Registry]]:
    async with AsyncExitStack() as stack:
        found: dict[str, Registry] = {}
        for proxy_id in PROXIES:
            nc = await nats.connect(nats_server.url)
            stack.push_async_callback(nc.close)
            found[proxy_id] = await Registry.open(nc.jetstream())
        yield found


async def race(registries: dict[str, Registry], function: str) -> list[str]:
    """Every racer of every proxy asks for `function`'s intent at once; the ids of those told they won."""
    winners: list[str] = []
    go = anyio.Event()

    async def ask(proxy_id: str) -> None:
        await go.wait()
        intent = decisions.scale_intent(function, proxy_id, time.time(), WINDOW)
        if await registries[proxy_id].take_scale_intent(intent):
            winners.append(proxy_id)

    async with anyio.create_task_group() as tg:
        for proxy_id in PROXIES:
            for _ in range(RACERS_PER_PROXY):
                tg.start_soon(ask, proxy_id)
        await anyio.sleep(0.05)
        go.set()
    return winners


async def test_two_proxies_racing_get_exactly_one_winner_per_window(registries: dict[str, Registry]) -> None:
    """The first window is won by create (absent-only), every later one by taking over the expired intent by
    compare-and-set: 8 racers from 2 proxies, one winner each time; within a window, nobody else."""
    reader = registries["p1"]
    rounds = 6
    winners_by_round: list[list[str]] = []
    for _ in range(rounds):
        winners = await race(registries, "fn")
        winners_by_round.append(winners)
        entry = await reader.get_scale_intent("fn")
        assert entry is not None and len(winners) == 1 and entry.record.proxy_id == winners[0], winners_by_round
        # Within the window: nobody, whichever proxy asks.
        assert await race(registries, "fn") == []
        await anyio.sleep(WINDOW + 0.1)
    print(f"winners per round: {winners_by_round}")
    # Another function's window is its own.
    assert len(await race(registries, "other")) == 1
    # Intents are not leases: nothing reading leases (the reaper) sees them.
    assert await reader.leases() == []


async def test_an_expired_intent_is_taken_over_and_a_fresh_one_is_not(registries: dict[str, Registry]) -> None:
    p1, p2 = registries["p1"], registries["p2"]
    now = time.time()
    # p1 asked and crashed: its window is over, but the entry is still there.
    assert await p1.take_scale_intent(ScaleIntent(function="fn", proxy_id="p1", asked_at=now - 10, expires_at=now - 8))
    crashed = await p2.get_scale_intent("fn")
    assert crashed is not None
    assert await p2.take_scale_intent(decisions.scale_intent("fn", "p2", time.time(), 30.0))
    taken = await p1.get_scale_intent("fn")
    assert taken is not None and taken.record.proxy_id == "p2" and taken.revision > crashed.revision
    # p2's window is in force: p1 stands back, and the entry stays p2's.
    assert not await p1.take_scale_intent(decisions.scale_intent("fn", "p1", time.time(), 30.0))
    kept = await p1.get_scale_intent("fn")
    assert kept == taken


async def test_an_untrustworthy_intent_is_taken_over_not_obeyed(registries: dict[str, Registry]) -> None:
    """A record that holds a window longer than the bucket keeps intents (a buggy or hostile writer) or that does not
    decode must not stop scaling: it counts as absent, and the next asker replaces it by compare-and-set."""
    p1 = registries["p1"]
    kv = p1.scale_intents_kv
    assert kv is not None
    now = time.time()
    forever = ScaleIntent(function="fn", proxy_id="p9", asked_at=now, expires_at=now + 10 * names.SCALE_INTENT_MAX_AGE)
    for bad in (encode(forever), b"{not json"):
        await kv.put("fn", bad)
        assert await p1.get_scale_intent("fn") is None
        assert await p1.take_scale_intent(decisions.scale_intent("fn", "p1", time.time(), 30.0))
        entry = await p1.get_scale_intent("fn")
        assert entry is not None and entry.record.proxy_id == "p1"
        await kv.purge("fn")


async def test_the_bucket_forgets_intents_on_its_own_and_a_reaper_registry_has_none(
    nats_server: LocalNatsServer, registries: dict[str, Registry]
) -> None:
    """Abandoned intents (a function deleted, a platform stopped) go with the bucket's max_age; the registry a
    reaper opens has no way to reach the bucket at all."""
    info = await registries["p1"].js.stream_info(kvread.stream_name(names.BUCKET_SCALE_INTENTS))
    assert info.config.max_age == names.SCALE_INTENT_MAX_AGE
    assert info.config.max_msgs_per_subject == 1
    nc = await nats.connect(nats_server.url)
    try:
        reaper_view = await Registry.open(nc.jetstream(), scale_intents=False)
        intent = decisions.scale_intent("fn", "r1", time.time(), 1.0)
        with pytest.raises(RuntimeError, match="without the scale-intents bucket"):
            await reaper_view.take_scale_intent(intent)
        with pytest.raises(RuntimeError):
            await reaper_view.get_scale_intent("fn")
    finally:
        await nc.close()
    # And opening the registry again (any service, any order) keeps the bucket as it is.
    nc = await nats.connect(nats_server.url)
    try:
        again = await Registry.open(nc.jetstream())
        assert await again.take_scale_intent(msgspec.structs.replace(intent, proxy_id="p1"))
    finally:
        await nc.close()
