"""The rig for the cluster suites (`make test-cluster`): brought up once per session, taken down after if this
session brought it up."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from rig import layout
from rig import state as rig_state
from rigtools import CHECKOUT, CLUSTER_SH, platform_nats

from aube.shared.registry import Registry


def _docker_or_skip() -> None:
    """The rig is Docker-in-Docker: without an engine its suites skip, as the Docker tests do (and fail under
    AUBE_REQUIRE_DOCKER=1, as in CI)."""
    try:
        answered = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60, check=False)
        why = answered.stderr.strip()[-300:] if answered.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as e:
        why = str(e)
    if why:
        if os.environ.get("AUBE_REQUIRE_DOCKER") == "1":
            pytest.fail(f"AUBE_REQUIRE_DOCKER=1 but no Docker engine answers: {why}")
        pytest.skip(f"no Docker engine: {why}")


def _rig_exists() -> bool:
    found = subprocess.run(
        ["docker", "ps", "-a", "-q", "--filter", f"label={layout.LABEL}"], capture_output=True, text=True, check=True
    )
    return bool(found.stdout.strip())


@pytest.fixture(scope="session")
def cluster() -> Iterator[Path]:
    """The rig's state folder, once `up` has returned (every node current, every proxy healthy). A rig already up is
    reused and left up; one this session started is taken down after, unless AUBE_CLUSTER_KEEP=1."""
    _docker_or_skip()
    existed = _rig_exists()
    started = time.monotonic()
    subprocess.run([str(CLUSTER_SH), "up"], check=True)
    print(f"rig up in {time.monotonic() - started:.1f}s ({'reused' if existed else 'from nothing'})")
    yield rig_state.folder(CHECKOUT)
    if not existed and os.environ.get("AUBE_CLUSTER_KEEP") != "1":
        subprocess.run([str(CLUSTER_SH), "down"], check=True)


@pytest.fixture
async def registry(cluster: Path) -> AsyncIterator[Registry]:
    nc = await platform_nats(cluster)
    try:
        yield await Registry.open(nc.jetstream(timeout=5))
    finally:
        await nc.close()
