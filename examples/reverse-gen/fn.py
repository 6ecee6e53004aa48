"""Async generator style (`async def fn(messages)`): each incoming message is yielded back reversed."""

from __future__ import annotations

from collections.abc import AsyncIterator


async def fn(messages: AsyncIterator[str | bytes]) -> AsyncIterator[str | bytes]:
    async for message in messages:
        yield message[::-1]
