"""Fixtures shared by every suite: a real nats-server per test, the real Docker engine, test labels.

Docker tests skip where no engine answers, except when AUBE_REQUIRE_DOCKER=1 (CI), where that is a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from aube.shared import names
from aube.shared.natsserver import LocalNatsServer


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def nats_server() -> Iterator[LocalNatsServer]:
    with LocalNatsServer() as server:
        yield server


@pytest.fixture
def test_owner() -> str:
    """A control-plane owner id unique to this test: its containers and images are found (and removed) by it."""
    return f"t{uuid.uuid4().hex[:10]}"


def _docker_or_skip() -> Any:
    try:
        import docker

        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as e:
        if os.environ.get("AUBE_REQUIRE_DOCKER") == "1":
            pytest.fail(f"AUBE_REQUIRE_DOCKER=1 but no Docker engine answers: {e}")
        pytest.skip(f"no Docker engine: {e}")
    return client


@pytest.fixture
def docker_client() -> Iterator[Any]:
    client = _docker_or_skip()
    yield client
    client.close()


@pytest.fixture
def docker_cleanup(docker_client: Any, test_owner: str) -> Iterator[str]:
    """Yield the test's owner id; at teardown remove every container and image it labelled."""
    yield test_owner
    label = f"{names.LABEL_OWNER}={test_owner}"
    for c in docker_client.containers.list(all=True, filters={"label": label}):
        c.remove(force=True)
    for image in docker_client.images.list(filters={"label": label}):
        docker_client.images.remove(image.id, force=True)
