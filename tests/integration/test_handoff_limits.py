"""A hostile function against a handed-off stream's limits (issue 11: "the proxy keeps what it needs to enforce the
stream's limits").

The instance enforces `[limits] stream_idle_timeout` and `stream_max_duration` on a handed-off stream, but it runs
in the function's own process, so the function can switch that off: these functions patch the instance's offer
parser to drop the limits, or its stream watcher never to report the end. The proxy enforces the limits from what the
function cannot reach (its copy of the client's socket: the kernel's count of the connection's quiet time, and the
time since the handoff) and cuts the stream; an instance that does not report the end after the cut is marked
unhealthy and replaced, never handed to the next client. Without the proxy's check these streams never end. With the
proxy killed, the reaper cuts such a stream once past its longest duration plus its grace (reaper/decisions.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest
from harness import wait_free
from nats.aio.client import Client as NATS
from support import exchange, nats_client, proxy_metrics, zip_base64
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from aube.reaper.decisions import OVERDUE_GRACE
from aube.shared import names
from aube.shared.bus import request
from aube.shared.registry import Registry
from aube.shared.schemas import UploadReply, UploadRequest

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)]

ECHO = """
async def fn(websocket):
    async for message in websocket:
        await websocket.send(json.dumps({"instance": os.environ.get("AUBE_INSTANCE_ID", ""), "echo": message}))
"""

# Drops the limits from every offer before the instance's watcher sees them (the function shares its process).
UNLIMITED = (
    """
import dataclasses, json, os
import aube.instance.handoff as handoff

_parse = handoff.parse_offer


def _unlimited(data):
    offer = _parse(data)
    return offer if offer is None else dataclasses.replace(offer, idle_timeout=None, max_duration=None)


handoff.parse_offer = _unlimited
"""
    + ECHO
)

# Also never lets the instance report the stream's end: its watcher returns only after the process does.
SILENT = (
    """
import dataclasses, json, os, threading
import aube.instance.handoff as handoff

_carry = handoff.HandoffListener._carry


def _carry_unlimited_and_never_report(self, client, offer, conn, served):
    _carry(self, client, dataclasses.replace(offer, idle_timeout=None, max_duration=None), conn, served)
    threading.Event().wait()


handoff.HandoffListener._carry = _carry_unlimited_and_never_report
"""
    + ECHO
)


async def upload(nc: NATS, tmp: Path, name: str, code: str, limits: str) -> None:
    folder = tmp / name
    folder.mkdir()
    (folder / "fn.py").write_text(code)
    manifest = f"[scaling]\nmin_free = 1\nmax_instances = 2\n[limits]\n{limits}\n"
    body = UploadRequest(name=name, zip=zip_base64(folder, {"aube.toml": manifest}))
    reply = await request(nc, names.SUBJECT_UPLOAD, body, UploadReply, 300)
    assert reply.ok, reply


def ws(port: int, name: str) -> connect:
    return connect(f"ws://127.0.0.1:{port}/{name}", proxy=None, open_timeout=60)


async def states(registry: Registry, name: str) -> dict[str, tuple[str, bool]]:
    return {e.record.instance_id: (e.record.state, e.record.handed_off) for e in await registry.instances(name)}


async def talk_until_cut(conn: ClientConnection, limit: float = 20) -> None:
    """Exchange a message every 0.2 s until the connection is closed (fails after `limit` seconds)."""
    with anyio.fail_after(limit):
        while True:
            try:
                await exchange(conn, "x")
            except ConnectionClosed:
                return
            await anyio.sleep(0.2)


def enforced(name: str, limit: str) -> str:
    return f'aube_handed_off_limits_enforced_total{{function="{name}",limit="{limit}"}}'


async def test_the_proxy_cuts_a_stream_whose_function_turned_off_its_limits(platform, tmp_path) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane()
    port, proxy = await platform.start_proxy(AUBE_HANDOFF="auto")
    async with nats_client(platform.nats_url) as (nc, registry):
        # Longest duration 3 s: a client that keeps talking is cut at 3 s plus the proxy's 1 s grace.
        await upload(nc, tmp_path, "longer", UNLIMITED, "stream_max_duration = 3")
        async with ws(port, "longer") as conn:
            started = time.monotonic()
            instance = (await exchange(conn, "x"))["instance"]
            await talk_until_cut(conn)
            took = time.monotonic() - started
        print(f"max_duration 3 s, evaded by the function: cut after {took:.2f} s")
        assert 3.0 <= took <= 12
        # The instance reported the end (its connection closed): released, and it serves the next client.
        with anyio.fail_after(20):
            while (await states(registry, "longer")).get(instance) != ("free", False):
                await anyio.sleep(0.1)
        seen = await proxy_metrics(proxy)
        assert seen[enforced("longer", "max_duration")] == 1
        assert seen['aube_streams_handed_off_total{function="longer"}'] == 1
        assert "close=max_duration" in proxy.log_text()

        # Idle timeout 2 s: a client that says nothing after its first message is cut, by the kernel's count.
        await upload(nc, tmp_path, "idler", UNLIMITED, "stream_idle_timeout = 2")
        async with ws(port, "idler") as conn:
            for _ in range(4):  # traffic keeps it open past the timeout
                await anyio.sleep(1.0)
                await exchange(conn, "x")
            quiet_since = time.monotonic()  # the last data either way: the reply
            with anyio.fail_after(20), pytest.raises(ConnectionClosed):
                await conn.recv()
            took = time.monotonic() - quiet_since
        print(f"idle_timeout 2 s, evaded by the function: cut after {took:.2f} s of quiet")
        assert 2.0 <= took <= 10
        assert (await proxy_metrics(proxy))[enforced("idler", "idle_timeout")] == 1


async def test_an_instance_that_reports_no_end_after_the_cut_is_replaced(platform, tmp_path) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane()
    port, proxy = await platform.start_proxy(AUBE_HANDOFF="auto", AUBE_HANDLER_GRACE="2")
    async with nats_client(platform.nats_url) as (nc, registry):
        await upload(nc, tmp_path, "clinger", SILENT, "stream_max_duration = 2")
        async with ws(port, "clinger") as conn:
            first = (await exchange(conn, "x"))["instance"]
            await talk_until_cut(conn)
        # No report within the handler's grace (2 s) plus 2 s: marked unhealthy, stopped, its entry gone.
        started = time.monotonic()
        with anyio.fail_after(30):
            while first in await states(registry, "clinger"):
                await anyio.sleep(0.1)
        print(f"instance gone {time.monotonic() - started:.2f} s after its stream was cut")
        assert "reported no end" in proxy.log_text()
        await wait_free(registry, "clinger", 1)
        async with ws(port, "clinger") as conn:
            assert (await exchange(conn, "x"))["instance"] != first


async def test_the_reaper_cuts_an_overdue_stream_whose_proxy_died(platform, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A handed-off stream outlives its proxy (test_handoff.py); with the function's own check off, nothing but the
    reaper is left to end it past its longest duration."""
    lease = 2.0
    await platform.start_controlplane()
    reaper = platform.start("aube.reaper", AUBE_REAP_INTERVAL="0.5", AUBE_LEASE_TTL=str(lease))
    port, proxy = await platform.start_proxy(AUBE_HANDOFF="auto", AUBE_LEASE_TTL=str(lease))
    async with nats_client(platform.nats_url) as (nc, registry):
        await upload(nc, tmp_path, "outlast", UNLIMITED, "stream_max_duration = 3")
        async with ws(port, "outlast") as conn:
            started = time.monotonic()
            instance = (await exchange(conn, "x"))["instance"]
            with anyio.fail_after(10):
                while (await states(registry, "outlast")).get(instance) != ("busy", True):
                    await anyio.sleep(0.05)
            proxy.kill9()
            await talk_until_cut(conn, limit=60)
            took = time.monotonic() - started
        print(f"max_duration 3 s, evaded by the function, its proxy killed: cut by the reaper after {took:.2f} s")
        assert took >= 3 + OVERDUE_GRACE
        with anyio.fail_after(30):
            while instance in await states(registry, "outlast"):
                await anyio.sleep(0.1)
        assert f"reaping outlast instance {instance} (overdue)" in reaper.log_text()
