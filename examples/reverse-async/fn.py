"""`async def fn(websocket)` style: every message comes back reversed."""

from __future__ import annotations

from websockets.asyncio.server import ServerConnection


async def fn(websocket: ServerConnection) -> None:
    async for message in websocket:
        await websocket.send(message[::-1])
