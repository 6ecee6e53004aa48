"""Fixtures shared by every suite: a real nats-server per test, the real Docker engine, test labels.

Docker tests skip where no engine answers, except when AUBE_REQUIRE_DOCKER=1 (CI), where that is a failure.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Platform, remove_labelled

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


def instance_network_names() -> tuple[str, str]:
    """A Docker network and bridge name of a test's own: the runtime creates them and closes the bridge to the host,
    and the test removes both (`remove_instance_network`), instead of leaving the shared default behind."""
    tag = uuid.uuid4().hex[:8]
    return f"aube-test-{tag}", f"aubt{tag}"


def remove_instance_network(client: Any, network: str, bridge: str) -> None:
    """Remove a test's instance network and its host rules (once the containers on it are gone).

    Docker 20.10 can keep a stale endpoint on a network after a container that was still being started is removed
    (seen once at the end of the 50-client Docker burst): the network then lists no container, yet "has active
    endpoints" for good. That is the engine's, not a leaked instance (the caller counts those): the network is left
    in place, and said so. A container still attached is a leak and fails the test."""
    import docker.errors

    try:
        from aube.controlplane.runtimes import instancenet
    except ImportError:  # the code under test predates the instance network: it created nothing
        return
    instancenet.remove_firewall(bridge)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.api.remove_network(network)
            return
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as e:
            if "active endpoints" not in str(e):
                raise
            attached = client.api.inspect_network(network).get("Containers") or {}
            assert not attached, f"containers still on {network}: {sorted(attached)}"
            if time.monotonic() > deadline:
                print(f"Docker kept a stale endpoint on {network} (no container on it): left in place", file=sys.stderr)
                return
            time.sleep(0.5)


@pytest.fixture
def instance_network(docker_client: Any) -> Iterator[tuple[str, str]]:
    """(network, bridge) for a test's runtime; removed at teardown (after `docker_cleanup`, which it precedes)."""
    network, bridge = instance_network_names()
    yield network, bridge
    remove_instance_network(docker_client, network, bridge)


@pytest.fixture
def docker_cleanup(docker_client: Any, test_owner: str) -> Iterator[str]:
    """Yield the test's owner id; at teardown remove every container and image it labelled."""
    yield test_owner
    remove_labelled(docker_client, test_owner)


# ---------------------------------------------------------------------------------------------------------------
# Platform services as real processes (harness.py; the benchmark runs on the same code).

# What every test platform's services get unless a test says otherwise: verbose logs for a failure's report,
# reconcile often enough to be seen within a test, a health timeout that a loaded CI machine meets.
TEST_SERVICE_ENV = {"AUBE_LOG_LEVEL": "DEBUG", "AUBE_RECONCILE_INTERVAL": "2", "AUBE_HEALTH_TIMEOUT": "60"}


def make_platform(nats_url: str, owner: str, runtime: str, tmp: Path) -> Platform:
    """A harness Platform with the tests' settings and a Docker network of its own (see instance_network_names)."""
    network, bridge = instance_network_names()
    return Platform(nats_url, owner, runtime, tmp, env_defaults=TEST_SERVICE_ENV, network=network, bridge=bridge)


@pytest.fixture(params=["process", pytest.param("docker", marks=pytest.mark.docker)])
def runtime_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "docker":
        _docker_or_skip().close()
    return str(request.param)


@pytest.fixture
def platform(nats_server: LocalNatsServer, test_owner: str, runtime_kind: str, tmp_path: Path) -> Iterator[Platform]:
    p = make_platform(nats_server.url, test_owner, runtime_kind, tmp_path)
    leaked = 0
    try:
        yield p
    finally:
        leaked = p.stop_all()
        if runtime_kind == "docker":
            client = _docker_or_skip()
            # Images are the function's versions: they outlive a shutdown by design; tests remove theirs.
            leaked += remove_labelled(client, test_owner)
            remove_instance_network(client, p.network, p.bridge)
            client.close()
    assert leaked == 0, f"{leaked} instance(s) outlived the control plane's shutdown"


@pytest.fixture
def platform_on(test_owner: str, runtime_kind: str, tmp_path: Path) -> Iterator[Callable[[str], Platform]]:
    """Like `platform`, on a NATS server the test starts itself (e.g. with deploy/nats.conf's authorization)."""
    made: list[Platform] = []

    def make(nats_url: str) -> Platform:
        made.append(make_platform(nats_url, test_owner, runtime_kind, tmp_path))
        return made[-1]

    yield make
    leaked = sum(p.stop_all() for p in made)
    if runtime_kind == "docker":
        client = _docker_or_skip()
        for p in made:
            remove_instance_network(client, p.network, p.bridge)
        client.close()
    assert leaked == 0, f"{leaked} instance(s) outlived the control plane's shutdown"
