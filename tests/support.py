"""Helpers the integration tests share (fixtures live in conftest.py; these are plain functions)."""

from __future__ import annotations

import base64
import io
import zipfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import nats
from nats.aio.client import Client as NATS

from aube.shared import names
from aube.shared.registry import Registry
from aube.shared.schemas import InstanceRecord


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


def credential(record: InstanceRecord) -> dict[str, str]:
    """The header a test presents when it dials an instance straight, as a proxy would (docs/security.md)."""
    return {names.HEADER_INSTANCE_SECRET: record.secret} if record.secret else {}
