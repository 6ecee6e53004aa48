"""Fixtures shared by every suite: a real nats-server per test, the real Docker engine, test labels.

Docker tests skip where no engine answers, except when AUBE_REQUIRE_DOCKER=1 (CI), where that is a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
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


def instance_network_names() -> tuple[str, str]:
    """A Docker network and bridge name of a test's own: the runtime creates them and closes the bridge to the host,
    and the test removes both (`remove_instance_network`), instead of leaving the shared default behind."""
    tag = uuid.uuid4().hex[:8]
    return f"aube-test-{tag}", f"aubt{tag}"


def remove_instance_network(client: Any, network: str, bridge: str) -> None:
    """Remove a test's instance network and its host rules (once the containers on it are gone)."""
    import contextlib

    import docker.errors

    try:
        from aube.controlplane.runtimes import instancenet
    except ImportError:  # the code under test predates the instance network: it created nothing
        return
    instancenet.remove_firewall(bridge)
    with contextlib.suppress(docker.errors.NotFound):
        client.api.remove_network(network)


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
    label = f"{names.LABEL_OWNER}={test_owner}"
    for c in docker_client.containers.list(all=True, filters={"label": label}):
        c.remove(force=True)
    for image in docker_client.images.list(filters={"label": label}):
        docker_client.images.remove(image.id, force=True)


# ---------------------------------------------------------------------------------------------------------------
# Platform services as real processes.

import os as _os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


class ServiceProcess:
    """One Aube service (`python -m aube.<module>`) as a child process with its own AUBE_* environment."""

    def __init__(self, module: str, env: dict[str, str], log_path: Path) -> None:
        self.module = module
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module], env=self.env, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO
        )
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 90) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def _stop_process_instances(owner: str, data_dir: str) -> int:
    """Teardown for the process runtime: stop (and count) instances of this test's owner still running."""
    import anyio

    from aube.controlplane.runtimes.process import ProcessRuntime
    from aube.shared.settings import ControlPlaneSettings

    async def sweep() -> int:
        runtime = ProcessRuntime(ControlPlaneSettings(owner=owner, data_dir=data_dir))
        leftovers = await runtime.instances(owner)
        for instance in leftovers:
            await runtime.stop(instance.handle)
        await runtime.close()
        return len(leftovers)

    # Teardown may run inside a test's event loop (a test stopping its platform early): sweep from a thread then.
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return anyio.run(sweep)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(anyio.run, sweep).result()


@pytest.fixture(params=["process", pytest.param("docker", marks=pytest.mark.docker)])
def runtime_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "docker":
        _docker_or_skip().close()
    return str(request.param)


class Platform:
    """Handle on the services a test started; everything is stopped and swept at teardown."""

    def __init__(self, nats_url: str, owner: str, runtime: str, tmp: Path) -> None:
        self.nats_url = nats_url
        self.owner = owner
        self.runtime = runtime
        self.tmp = tmp
        self.data_dir = str(tmp / "data")
        self.services: list[ServiceProcess] = []
        self.leaked = 0
        # A login for the test's own requests (wait_ready) on a server with accounts: the control plane's.
        self.login: dict[str, str] = {}
        self.network, self.bridge = instance_network_names()

    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in _os.environ.items() if not k.startswith("AUBE_") or k == "AUBE_REQUIRE_DOCKER"}
        env.update(
            AUBE_NATS_URL=self.nats_url,
            AUBE_OWNER=self.owner,
            AUBE_RUNTIME=self.runtime,
            AUBE_DATA_DIR=self.data_dir,
            AUBE_LOG_LEVEL="DEBUG",
            AUBE_RECONCILE_INTERVAL="2",
            AUBE_HEALTH_TIMEOUT="60",
            # A stopped control plane stops its instances: whatever runs after teardown is a leak.
            AUBE_STOP_INSTANCES_ON_EXIT="true",
            AUBE_INSTANCE_NETWORK=self.network,
            AUBE_INSTANCE_BRIDGE=self.bridge,
        )
        env.update(overrides)
        return env

    def start(self, module: str, **overrides: str) -> ServiceProcess:
        name = module.rsplit(".", 1)[-1]
        service = ServiceProcess(module, self.env(**overrides), self.tmp / f"{name}-{len(self.services)}.log").start()
        self.services.append(service)
        return service

    async def start_controlplane(self, **overrides: str) -> ServiceProcess:
        if "AUBE_NATS_USER" in overrides:  # a server with accounts: wait_ready asks as the control plane
            self.login = {"user": overrides["AUBE_NATS_USER"], "password": overrides["AUBE_NATS_PASSWORD"]}
        service = self.start("aube.controlplane", **overrides)
        await self.wait_ready(service)
        return service

    async def wait_ready(self, service: ServiceProcess, timeout: float = 120) -> None:
        """Wait until the control plane answers a list request (its subscriptions are live)."""
        import anyio
        import nats

        from aube.shared import names as n
        from aube.shared.bus import request
        from aube.shared.errors import ServiceUnavailable
        from aube.shared.natsconn import server_list
        from aube.shared.schemas import ListReply, ListRequest

        nc = await nats.connect(servers=server_list(self.nats_url), **self.login)  # a cluster's list too
        try:
            deadline = time.monotonic() + timeout
            while True:
                assert service.proc is not None
                if service.proc.poll() is not None:
                    raise AssertionError(f"{service.module} exited:\n{service.log_text()[-3000:]}")
                try:
                    await request(nc, n.SUBJECT_LIST, ListRequest(), ListReply, 1.0)
                    return
                except ServiceUnavailable:
                    if time.monotonic() > deadline:
                        raise
                    await anyio.sleep(0.1)
        finally:
            await nc.close()

    def stop_all(self) -> int:
        """Stop the services; return how many instances outlived them so far (each one a leak). Idempotent."""
        for service in reversed(self.services):
            service.stop()
        # pytest shows what teardown prints only for a failed test: the services' last words, for CI's report.
        for service in self.services:
            print(f"----- {service.log_path.name} (last lines) -----\n{service.log_text()[-6000:]}")
        if self.runtime == "process":
            self.leaked += _stop_process_instances(self.owner, self.data_dir)
        return self.leaked


@pytest.fixture
def platform(nats_server: LocalNatsServer, test_owner: str, runtime_kind: str, tmp_path: Path) -> Iterator[Platform]:
    p = Platform(nats_server.url, test_owner, runtime_kind, tmp_path)
    leaked = 0
    try:
        yield p
    finally:
        leaked = p.stop_all()
        if runtime_kind == "docker":
            client = _docker_or_skip()
            label = f"{names.LABEL_OWNER}={test_owner}"
            for c in client.containers.list(all=True, filters={"label": label}):
                leaked += 1
                c.remove(force=True)
            # Images are the function's versions: they outlive a shutdown by design; tests remove theirs.
            for image in client.images.list(filters={"label": label}):
                client.images.remove(image.id, force=True)
            remove_instance_network(client, p.network, p.bridge)
            client.close()
    assert leaked == 0, f"{leaked} instance(s) outlived the control plane's shutdown"


@pytest.fixture
def platform_on(test_owner: str, runtime_kind: str, tmp_path: Path) -> Iterator[Callable[[str], Platform]]:
    """Like `platform`, on a NATS server the test starts itself (e.g. with deploy/nats.conf's authorization)."""
    made: list[Platform] = []

    def make(nats_url: str) -> Platform:
        made.append(Platform(nats_url, test_owner, runtime_kind, tmp_path))
        return made[-1]

    yield make
    leaked = sum(p.stop_all() for p in made)
    if runtime_kind == "docker":
        client = _docker_or_skip()
        for p in made:
            remove_instance_network(client, p.network, p.bridge)
        client.close()
    assert leaked == 0, f"{leaked} instance(s) outlived the control plane's shutdown"
