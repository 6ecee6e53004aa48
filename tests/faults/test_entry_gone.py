"""A stream lives only while its claim does (issue 10: a paused host's streams end within 10 s).

When the registry stops accounting for an instance (the reaper judged its host dead and dropped its entries, or
reconcile dropped an entry whose instance it could not find), the platform no longer counts it against
`max_instances` and the pool is rebuilt elsewhere. A stream still relayed to it would run on an instance nobody
accounts for, and on a paused host nothing else ends it: the paused kernel still acknowledges every segment and
every keepalive probe. So the proxy ends a stream once its entry is deleted or names another instance.

Real control plane, proxy, nats-server and process instances; the entry is deleted as the reaper deletes a dead
host's entries (compare-and-set on the revision it read). The control plane is stopped (SIGSTOP) meanwhile: on a
paused host nobody can stop the instance, and here the control plane would stop it (an instance the registry does
not know), which ends the stream by another way.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import anyio
import pytest
from support import nats_client, zip_base64
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from aube.shared import names
from aube.shared.bus import request
from aube.shared.schemas import UploadReply, UploadRequest

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ENDED_WITHIN = 5.0  # generous for a shared machine; the view follows a delete within milliseconds


async def ask(ws: ClientConnection, text: str) -> str:
    await ws.send(text)
    reply = json.loads(await ws.recv())
    assert reply["echo"] == text
    return str(reply["instance"])


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_a_stream_ends_when_its_entry_is_deleted_and_the_others_go_on(platform) -> None:  # type: ignore[no-untyped-def]
    controlplane = await platform.start_controlplane()
    port, _ = await platform.start_proxy()
    manifest = "[scaling]\nmin_free = 2\nmax_instances = 4\n"
    async with nats_client(platform.nats_url) as (nc, registry):
        body = UploadRequest(name="gone", zip=zip_base64(EXAMPLES / "whoami", {"aube.toml": manifest}))
        await request(nc, names.SUBJECT_UPLOAD, body, UploadReply, 300)
        url = f"ws://127.0.0.1:{port}/gone"
        async with (
            connect(url, proxy=None, open_timeout=30, ping_interval=None) as doomed,
            connect(url, proxy=None, open_timeout=30, ping_interval=None) as bystander,
        ):
            doomed_id = await ask(doomed, "one")
            bystander_id = await ask(bystander, "one")
            assert doomed_id != bystander_id
            entry = next(e for e in await registry.instances("gone") if e.record.instance_id == doomed_id)
            assert entry.record.state == "busy"
            os.kill(controlplane.proc.pid, signal.SIGSTOP)
            try:
                deleted_at = anyio.current_time()
                assert await registry.delete_instance(entry.key, entry.revision)
                with anyio.fail_after(ENDED_WITHIN), pytest.raises(ConnectionClosed):  # noqa: PT012
                    while True:
                        await ask(doomed, "still there?")
                        await anyio.sleep(0.05)
                ended_after = anyio.current_time() - deleted_at
            finally:
                os.kill(controlplane.proc.pid, signal.SIGCONT)
            print(f"the stream on {doomed_id} ended {ended_after * 1000:.0f} ms after its entry was deleted")
            # The others are untouched, and the release that followed did not write the entry back.
            for n in range(10):
                assert await ask(bystander, str(n)) == bystander_id
                await anyio.sleep(0.1)
            assert all(e.record.instance_id != doomed_id for e in await registry.instances("gone"))
