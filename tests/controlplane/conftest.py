"""Fixtures of the control plane's logic tests: a `Plane` (fake_plane.py) per test on its own nats-server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from fake_plane import Plane
from fake_runtime import FakeRuntime

from aube.controlplane.core import ControlPlane
from aube.shared import names
from aube.shared.natsserver import LocalNatsServer
from aube.shared.registry import Registry
from aube.shared.settings import ControlPlaneSettings


@pytest.fixture
def health_timeout() -> float:
    """How long a start may take to pass its health check (fake instances pass at once); a test about a start that
    never passes parametrizes it shorter."""
    return 1.0


@pytest.fixture
def settings(nats_server: LocalNatsServer, tmp_path: Path, health_timeout: float) -> ControlPlaneSettings:
    return ControlPlaneSettings(
        nats_url=nats_server.url,
        runtime="process",
        owner=f"t{uuid.uuid4().hex[:10]}",
        data_dir=str(tmp_path / "data"),
        health_timeout=health_timeout,
        delete_grace=30.0,
    )


@pytest.fixture
async def plane(settings: ControlPlaneSettings) -> AsyncIterator[Plane]:
    runtime = FakeRuntime()
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        registry = await Registry.open(js)
        bundles = await js.create_object_store(names.BUCKET_BUNDLES)
        yield Plane(ControlPlane(settings, nc, registry, runtime, bundles), runtime, registry, nc)
    finally:
        await runtime.close()
        await nc.close()
