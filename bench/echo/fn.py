"""The benchmarks' echo function: every message comes back unchanged (no per-byte work in the function)."""

from __future__ import annotations

from websockets.asyncio.server import ServerConnection


async def fn(websocket: ServerConnection) -> None:
    async for message in websocket:
        await websocket.send(message)
