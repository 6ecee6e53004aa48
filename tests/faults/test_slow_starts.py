"""The adaptive claim timeout (issue 11, bursts): a client waits for the instances that are starting for it.

A fixed claim timeout refused clients whose instances were on their way: parallel Docker starts take longer than
10 s, and a burst of 12 clients on a function with min_free 2 got four 503s. Now, while the proxy's view shows
instances of the function starting, a waiting client keeps waiting, up to `AUBE_CLAIM_TIMEOUT_MAX` (60 s). Here a
function takes 4 s to import, under a 1.5 s claim timeout, on the real process runtime.
"""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
from support import nats_client, zip_base64
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from aube.shared import names
from aube.shared.bus import request
from aube.shared.schemas import UploadReply, UploadRequest

pytestmark = pytest.mark.anyio

SLOW = """
import json, os, time

if os.environ.get("AUBE_INSTANCE_ID"):
    time.sleep(4)  # a slow import, on every instance start (the upload's own checks do not import it)


def fn(websocket):
    for message in websocket:
        websocket.send(json.dumps({"instance": os.environ.get("AUBE_INSTANCE_ID")}))
"""


async def one_client(port: int, name: str = "slow") -> str:
    async with connect(f"ws://127.0.0.1:{port}/{name}", proxy=None, open_timeout=90) as ws:
        await ws.send("hi")
        return str(json.loads(await ws.recv())["instance"])


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_clients_wait_for_the_instances_starting_for_them_and_no_longer_than_the_ceiling(
    platform, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane()
    port, _ = await platform.start_proxy(AUBE_CLAIM_TIMEOUT="1.5", AUBE_SCALE_COOLDOWN="0.5")
    ceilinged, _ = await platform.start_proxy(
        AUBE_CLAIM_TIMEOUT="1.5", AUBE_CLAIM_TIMEOUT_MAX="2", AUBE_SCALE_COOLDOWN="0.5"
    )
    folder = tmp_path / "slow"
    folder.mkdir()
    (folder / "fn.py").write_text(SLOW)
    manifest = "[scaling]\nmin_free = 0\nmax_instances = 6\n"
    async with nats_client(platform.nats_url) as (nc, _registry):
        for name in ("slow", "slower"):
            body = UploadRequest(name=name, zip=zip_base64(folder, {"aube.toml": manifest}))
            await request(nc, names.SUBJECT_UPLOAD, body, UploadReply, 300)
        # No instance yet: three clients at once make the proxy ask for three, which take 4 s or more to start.
        began = anyio.current_time()
        served: list[str] = []

        async def client() -> None:
            served.append(await one_client(port))

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(client)
        waited = anyio.current_time() - began
        print(f"3 clients of a 4 s cold start under a 1.5 s claim timeout served after {waited:.1f}s")
        assert len(served) == 3 and waited > 3.5
        # The ceiling holds: with AUBE_CLAIM_TIMEOUT_MAX=2, a client of instances still starting is refused after it.
        began = anyio.current_time()
        with pytest.raises(InvalidStatus) as refused:
            await one_client(ceilinged, "slower")
        waited = anyio.current_time() - began
        print(f"with a 2 s ceiling, refused after {waited:.1f}s")
        assert refused.value.response.status_code == 503
        assert 1.8 < waited < 3.9
