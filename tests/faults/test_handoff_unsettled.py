"""A handed-off stream ends while NATS is away, and its proxy dies before the registry answers again.

The proxy cannot write the claim's release (or its keep): the outcome is unknown, and the proxy would settle it once
the registry answers. Should it die first, nobody writes it: the claim stays busy, flagged `handed_off`, which the
reaper leaves alone. An instance the proxy acknowledged would then wait, idle, for ever, holding a slot of the
function. So the proxy acknowledges only a settlement it has written: without the ack the instance exits after its
stream, and the control plane removes its entry (aube.instance.handoff).
"""

from __future__ import annotations

import os
import signal
import time

import anyio
import pytest
from harness import wait_free
from support import REPO, exchange, nats_client, zip_base64
from websockets.asyncio.client import connect

from aube.shared import names
from aube.shared.bus import request
from aube.shared.natsserver import LocalNatsServer
from aube.shared.schemas import UploadReply, UploadRequest

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)]


async def test_an_instance_whose_release_was_never_written_exits_after_its_stream(
    platform, nats_server: LocalNatsServer
) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane()
    port, proxy = await platform.start_proxy(AUBE_HANDOFF="auto")
    async with nats_client(platform.nats_url) as (nc, registry):
        manifest = "[scaling]\nmin_free = 1\nmax_instances = 2\n"
        body = UploadRequest(name="who", zip=zip_base64(REPO / "examples" / "whoami", {"aube.toml": manifest}))
        assert (await request(nc, names.SUBJECT_UPLOAD, body, UploadReply, 300)).ok
        await wait_free(registry, "who", 1)
    conn = await connect(f"ws://127.0.0.1:{port}/who", proxy=None, open_timeout=60)
    instance = (await exchange(conn, "hello"))["instance"]
    async with nats_client(platform.nats_url) as (_, registry):
        with anyio.fail_after(10):
            while not any(
                e.record.instance_id == instance and e.record.handed_off for e in await registry.instances("who")
            ):
                await anyio.sleep(0.05)

    assert nats_server.process is not None
    os.kill(nats_server.process.pid, signal.SIGSTOP)
    try:
        await conn.close()  # the stream ends; the proxy's write of its release meets the outage
        with anyio.fail_after(60):
            while "once the registry answers" not in proxy.log_text():  # the release's or the keep's write
                await anyio.sleep(0.2)
        proxy.kill9()  # before the registry answers: nobody will write that release
    finally:
        os.kill(nats_server.process.pid, signal.SIGCONT)
    killed_at = time.monotonic()

    # Not acknowledged, the instance exits (its proxy's connection broke: no ack will come); its entry goes with it.
    async with nats_client(platform.nats_url) as (_, registry):
        try:
            with anyio.fail_after(120):
                while any(e.record.instance_id == instance for e in await registry.instances("who")):
                    await anyio.sleep(0.5)
        except TimeoutError:
            entries = [
                (e.record.instance_id, e.record.state, e.record.handed_off) for e in await registry.instances("who")
            ]
            raise AssertionError(f"instance {instance} still accounted for: {entries}") from None
    print(f"the unacknowledged instance's entry went {time.monotonic() - killed_at:.1f}s after its proxy was killed")
