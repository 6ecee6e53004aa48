"""Asking an instance how it is: one HTTP GET of the in-instance server's health path, with its credential.

The control plane asks while an instance starts (is it up, and is it the instance the registry names?); a proxy asks
after a stream (has the function's handler returned, so the slot is free?). The answer is the instance's own
JSON (`{"status", "busy", "streams_served", "instance"}`), or None when there is no 200 answer.
"""

from __future__ import annotations

import json
from typing import Any

import anyio

from aube.shared import addresses, names

MAX_ANSWER = 65536


async def read(address: str, secret: str = "", timeout: float = 2.0) -> dict[str, Any] | None:
    host = "instance" if address.startswith(addresses.UNIX_PREFIX) else address
    credential = f"{names.HEADER_INSTANCE_SECRET}: {secret}\r\n" if secret else ""
    request = f"GET {names.INSTANCE_HEALTH_PATH} HTTP/1.1\r\nHost: {host}\r\n{credential}Connection: close\r\n\r\n"
    answer = b""
    # asyncio's streams, not anyio's: anyio's connect_tcp (happy eyeballs, a task group per connection) cost 272 µs
    # of the asker's CPU per answer against 84 µs (measured on uvloop), and a proxy asks after relayed streams.
    with anyio.move_on_after(timeout) as scope:
        try:
            reader, writer = await addresses.open_streams(address)
            try:
                writer.write(request.encode())
                while len(answer) < MAX_ANSWER and (chunk := await reader.read(MAX_ANSWER - len(answer))):
                    answer += chunk
            finally:
                writer.close()
        except (OSError, ValueError):
            return None
    if scope.cancelled_caught:
        return None
    head, _, body = answer.partition(b"\r\n\r\n")
    if head.split(b" ", 2)[1:2] != [b"200"]:
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None
