"""`instance_health.read` against real loopback servers: the instance's answer, or None for anything else."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import anyio
import pytest

from aube.shared import instance_health

pytestmark = pytest.mark.anyio

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def served(answer: Answer) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


def replying(status: str, body: bytes) -> Answer:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"X-Aube-Instance-Secret: s\r\n" in head
        writer.write(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        writer.close()

    return answer


async def test_the_instances_answer_is_returned() -> None:
    server, address = await served(replying("200 OK", json.dumps({"status": "ok", "busy": False}).encode()))
    async with server:
        assert await instance_health.read(address, "s") == {"status": "ok", "busy": False}


@pytest.mark.parametrize(
    ("status", "body"), [("503 Busy", b'{"busy": true}'), ("200 OK", b"not json"), ("200 OK", b"[1]")]
)
async def test_anything_but_a_json_object_with_200_is_none(status: str, body: bytes) -> None:
    server, address = await served(replying(status, body))
    async with server:
        assert await instance_health.read(address, "s") is None


async def test_a_silent_instance_is_none_within_the_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()  # until the asker gives up and closes
        finally:
            writer.close()

    server, address = await served(silent)
    async with server:
        with anyio.fail_after(5):
            assert await instance_health.read(address, "s", timeout=0.3) is None


async def test_an_unreachable_or_unparsable_address_is_none() -> None:
    server, address = await served(replying("200 OK", b"{}"))
    server.close()
    await server.wait_closed()
    assert await instance_health.read(address, "s") is None
    assert await instance_health.read("no port here", "s") is None
    assert await instance_health.read("unix:/nonexistent/instance.sock", "s") is None
