"""Replies to every message with which instance answered and how many streams this process carries now.

The count is kept by the function itself (up on entry, down in `finally`), so a test can prove from the
outside that an instance never carries two streams at once.
"""

from __future__ import annotations

import json
import os

from websockets.asyncio.server import ServerConnection

streams = 0


async def fn(websocket: ServerConnection) -> None:
    global streams
    streams += 1
    try:
        async for message in websocket:
            text = message if isinstance(message, str) else message.decode("utf-8", errors="replace")
            reply = {"instance": os.environ.get("AUBE_INSTANCE_ID", ""), "streams": streams, "echo": text}
            await websocket.send(json.dumps(reply))
    finally:
        streams -= 1
