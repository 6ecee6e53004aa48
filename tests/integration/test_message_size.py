"""`[limits] max_message` (issue 11): the largest message an instance accepts, per function.

websockets' own default, 1 MiB, was the hidden limit: a larger message ended the stream with 1009. Now the function
chooses (1k to 64m, at most a quarter of its memory). Through a real proxy to real process instances.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support import nats_client, zip_base64
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError

from aube.shared import names
from aube.shared.bus import request
from aube.shared.schemas import UploadReply, UploadRequest

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TWO_MIB = "a" * (2 * 1024 * 1024) + "b"


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_a_function_sets_its_largest_message_and_a_larger_one_ends_with_1009(platform) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane()
    port, _ = await platform.start_proxy()
    async with nats_client(platform.nats_url) as (nc, _registry):
        for name, limits in (("small", ""), ("large", '[limits]\nmax_message = "4m"\n')):
            body = UploadRequest(name=name, zip=zip_base64(EXAMPLES / "reverse-async", {"aube.toml": limits}))
            await request(nc, names.SUBJECT_UPLOAD, body, UploadReply, 300)
        # The default: 1 MiB, as before; 2 MiB ends the stream with 1009 (message too big).
        async with connect(f"ws://127.0.0.1:{port}/small", proxy=None, max_size=None) as ws:
            await ws.send("ab")
            assert await ws.recv() == "ba"
            await ws.send(TWO_MIB)
            with pytest.raises(ConnectionClosedError) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        # 4m: the same message goes through, and comes back reversed.
        async with connect(f"ws://127.0.0.1:{port}/large", proxy=None, max_size=None) as ws:
            await ws.send(TWO_MIB)
            assert await ws.recv() == TWO_MIB[::-1]
