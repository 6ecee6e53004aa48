"""Helpers the integration tests share (fixtures live in conftest.py; these are plain functions)."""

from __future__ import annotations

import base64
import io
import zipfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS
from websockets.asyncio.client import connect, unix_connect

from aube.shared import addresses
from aube.shared.registry import Registry


def zip_base64(folder: Path, extra: Mapping[str, str] | None = None) -> str:
    """The folder as AubeFaaS's upload script sent it: a base64 zip with the files at the archive root.
    `extra` files are added, replacing any of the same name."""
    extra = extra or {}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.name not in extra:
                z.write(path, str(path.relative_to(folder)))
        for name, text in extra.items():
            z.writestr(name, text)
    return base64.b64encode(buf.getvalue()).decode()


@asynccontextmanager
async def nats_client(url: str) -> AsyncIterator[tuple[NATS, Registry]]:
    nc = await nats.connect(url)
    try:
        yield nc, await Registry.open(nc.jetstream())
    finally:
        await nc.close()


def instance_ws(address: str, path: str = "/fn", **kwargs: Any) -> connect:
    """A websockets client straight to an instance's registry address: `host:port`, or `unix:<path>` (a
    sandboxed process instance), as the proxy dials it."""
    target = addresses.parse(address)
    if isinstance(target, addresses.UnixAddress):
        return unix_connect(target.path, f"ws://instance{path}", **kwargs)
    return connect(f"ws://{target.host}:{target.port}{path}", proxy=None, **kwargs)
