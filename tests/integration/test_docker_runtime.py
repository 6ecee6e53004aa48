"""The docker runtime against the real engine: images built locally, hardened containers, real WebSocket clients.

The first run builds the shared base image (a minute or two, from Debian packages); later runs reuse it and
the runtime image, so only the small function images are built. Everything a test creates carries the test's
owner label and is removed by the `docker_cleanup` fixture; the shared base and runtime images are kept.
"""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from aube.controlplane.runtimes import images, instancenet
from aube.controlplane.runtimes.base import InstanceSpec, StartedInstance
from aube.controlplane.runtimes.docker import DockerRuntime
from aube.shared import names
from aube.shared.errors import BuildFailed, RuntimeFailure
from aube.shared.schemas import LimitsSection, Manifest
from aube.shared.settings import DEFAULT_BASE_IMAGE, ControlPlaneSettings

pytestmark = [pytest.mark.docker, pytest.mark.anyio]

ECHO_FN = """\
async def fn(websocket):
    async for message in websocket:
        await websocket.send("echo:" + message)
"""

# AubeFaaS's sample style: synchronous, and imports the websockets its requirements.txt asks for.
REVERSE_FN = """\
import websockets


def fn(websocket):
    for message in websocket:
        websocket.send(message[::-1])
"""


@pytest.fixture
def settings(instance_network: tuple[str, str], docker_cleanup: str, tmp_path: Path) -> ControlPlaneSettings:
    network, bridge = instance_network
    return ControlPlaneSettings(
        owner=docker_cleanup,
        data_dir=str(tmp_path / "data"),
        health_timeout=60.0,
        instance_network=network,
        instance_bridge=bridge,
    )


@pytest.fixture
async def runtime(settings: ControlPlaneSettings) -> AsyncIterator[DockerRuntime]:
    rt = await DockerRuntime.connect(settings)
    try:
        yield rt
    finally:
        await rt.close()


def make_fn(root: Path, source: str, requirements: str | None = None) -> Path:
    folder = root / f"fn-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    (folder / "fn.py").write_text(source)
    # A private file on the host must still be readable by the instance's user inside the image.
    (folder / "fn.py").chmod(0o600)
    if requirements is not None:
        (folder / "requirements.txt").write_text(requirements)
    return folder


def spec_for(owner: str, function: str, artifact: str, manifest: Manifest | None = None) -> InstanceSpec:
    return InstanceSpec(
        function=function,
        version=1,
        slot=0,
        instance_id=uuid.uuid4().hex[:8],
        artifact=artifact,
        manifest=manifest or Manifest(),
        owner=owner,
    )


def _health_status(address: str) -> int | None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{address}{names.INSTANCE_HEALTH_PATH}", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


async def wait_healthy(started: StartedInstance, timeout: float = 60.0) -> None:
    with anyio.fail_after(timeout):
        while True:
            if await anyio.to_thread.run_sync(_health_status, started.address) == 200:
                return
            await anyio.sleep(0.2)


async def exchange(address: str, message: str) -> str:
    async with connect(f"ws://{address}/", proxy=None, open_timeout=10) as ws:
        await ws.send(message)
        with anyio.fail_after(10):
            reply = await ws.recv()
    assert isinstance(reply, str)
    return reply


def exec_in(docker_client: Any, container: str, cmd: list[str]) -> str:
    exec_id = docker_client.api.exec_create(container, cmd)["Id"]
    return str(docker_client.api.exec_start(exec_id).decode().strip())


async def test_base_and_runtime_images(settings: ControlPlaneSettings, docker_client: Any) -> None:
    lines: list[str] = []
    # Built here when missing (the first run on a machine); the shared image is never deleted by tests.
    base = await anyio.to_thread.run_sync(images.ensure_base_image, docker_client, settings, lines.append)
    assert base == DEFAULT_BASE_IMAGE
    base_labels = docker_client.images.get(base).labels
    assert base_labels.get(names.LABEL_MANAGED) == "true"
    assert names.LABEL_OWNER not in base_labels  # shared by every control plane

    tag = await anyio.to_thread.run_sync(images.ensure_runtime_image, docker_client, settings, lines.append)
    base_id = docker_client.images.get(base).id
    assert tag == f"{images.RUNTIME_REPOSITORY}:{images.runtime_digest(base_id)}"
    config = docker_client.images.get(tag).attrs["Config"]
    assert config["User"] == "65534:65534"
    assert config["Entrypoint"] == ["python3", "-m", "aube.instance"]
    assert config["WorkingDir"] == "/opt/aube/fn"
    assert "PYTHONPATH=/opt/aube/lib:/opt/aube/deps" in config["Env"]
    assert names.LABEL_OWNER not in (config.get("Labels") or {})
    # A second call finds the image instead of building it again.
    again: list[str] = []
    assert await anyio.to_thread.run_sync(images.ensure_runtime_image, docker_client, settings, again.append) == tag
    assert again == []
    # The tag follows the base image: a new base means a new runtime image.
    assert images.runtime_digest("sha256:other") != images.runtime_digest(base_id)


async def test_missing_configured_base_image_is_a_clear_error(
    settings: ControlPlaneSettings, docker_client: Any
) -> None:
    custom = msgspec_replace(settings, base_image="aube-test-missing-base:nope")
    with pytest.raises(RuntimeFailure, match="aube-test-missing-base:nope"):
        await anyio.to_thread.run_sync(images.ensure_base_image, docker_client, custom, lambda _: None)


def msgspec_replace(settings: ControlPlaneSettings, **changes: Any) -> ControlPlaneSettings:
    import msgspec

    return msgspec.structs.replace(settings, **changes)


async def test_connect_without_engine_fails_clearly(
    settings: ControlPlaneSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A TCP address nothing listens on (docker-py leaks the socket of a failed unix connect, which
    # filterwarnings=error would turn into a failure of whichever test runs when it is collected).
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:9")
    with pytest.raises(RuntimeFailure, match="no Docker engine"):
        await DockerRuntime.connect(settings)


async def test_prepare_start_stream_stop(
    runtime: DockerRuntime, settings: ControlPlaneSettings, docker_client: Any, tmp_path: Path
) -> None:
    owner = settings.owner
    log: list[str] = []
    folder = make_fn(tmp_path, ECHO_FN)
    tag = await runtime.prepare("echo", 1, folder, Manifest(), owner, log.append)
    assert tag == names.image_tag(owner, "echo", 1)
    assert any("Successfully tagged" in line for line in log)  # build output reached the log

    manifest = Manifest(limits=LimitsSection(memory="128m", cpus=0.25, pids=64))
    spec = spec_for(owner, "echo", tag, manifest)
    # A firewall reload since the runtime started (here: its jump deleted) is repaired before an instance starts.
    jump = f"-A INPUT -i {settings.instance_bridge} -j {names.firewall_chain(settings.instance_bridge)}"
    _iptables("-D", *jump.split()[1:])
    started = await runtime.start(spec)
    assert jump in _iptables("-S", "INPUT").splitlines()
    try:
        assert started.instance_id == spec.instance_id
        assert started.address.startswith(f"{settings.advertise_host}:")
        await wait_healthy(started)
        assert await exchange(started.address, "hello") == "echo:hello"
        assert await runtime.is_alive(started.handle)

        info = docker_client.api.inspect_container(started.handle)
        host = info["HostConfig"]
        assert info["Name"] == "/" + names.container_name(owner, "echo", spec.instance_id)
        assert info["Config"]["User"] == "65534:65534"
        assert host["ReadonlyRootfs"] is True
        assert host["CapDrop"] == ["ALL"]
        assert "no-new-privileges" in host["SecurityOpt"]
        assert host["Memory"] == 128 * 2**20
        assert host["NanoCpus"] == 250_000_000
        assert host["PidsLimit"] == 64
        assert "/tmp" in host["Tmpfs"]
        assert host["Init"] is True
        assert host["NetworkMode"] == settings.instance_network
        assert list(info["NetworkSettings"]["Networks"]) == [settings.instance_network]
        # The network has no IPv6, and the container no IPv6 address at all (not even link-local).
        assert exec_in(docker_client, started.handle, ["cat", "/proc/net/if_inet6"]) == ""
        bindings = info["NetworkSettings"]["Ports"]["8080/tcp"]
        assert bindings
        assert {b["HostIp"] for b in bindings} == {"127.0.0.1"}
        assert host["PortBindings"]["8080/tcp"] == [{"HostIp": "127.0.0.1", "HostPort": ""}]
        labels = info["Config"]["Labels"]
        assert labels[names.LABEL_OWNER] == owner
        assert labels[names.LABEL_INSTANCE] == spec.instance_id
        # The function's files belong to root and are not writable by the instance's user, but readable.
        assert exec_in(docker_client, started.handle, ["stat", "-c", "%u %a", "/opt/aube/fn/fn.py"]) == "0 644"
        assert exec_in(docker_client, started.handle, ["id", "-u"]) == "65534"

        (found,) = await runtime.instances(owner)
        assert (found.handle, found.instance_id, found.function, found.version, found.slot, found.alive) == (
            started.handle,
            spec.instance_id,
            "echo",
            1,
            0,
            True,
        )
        artifacts = await runtime.artifacts(owner)
        assert [(a.ref, a.function, a.version) for a in artifacts] == [(tag, "echo", 1)]

        # Stopping sends SIGTERM first, so a stream still open is closed with 1001 (going away), not cut.
        async with connect(f"ws://{started.address}/", proxy=None, open_timeout=10) as ws:
            await ws.send("last")
            assert await ws.recv() == "echo:last"
            await runtime.stop(started.handle)
            with anyio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1001
    finally:
        await runtime.stop(started.handle)

    assert not docker_client.containers.list(all=True, filters={"id": started.handle})
    assert not await runtime.is_alive(started.handle)
    assert await runtime.instances(owner) == []
    await runtime.stop(started.handle)  # a missing instance is not an error

    await runtime.remove_artifact(tag)
    assert await runtime.artifacts(owner) == []
    await runtime.remove_artifact(tag)  # nor is a missing artifact


async def test_requirements_are_installed_into_the_image(
    runtime: DockerRuntime, settings: ControlPlaneSettings, tmp_path: Path
) -> None:
    folder = make_fn(tmp_path, REVERSE_FN, requirements="websockets>=12.0\n")
    tag = await runtime.prepare("reverse", 3, folder, Manifest(), settings.owner, lambda _: None)
    started = await runtime.start(spec_for(settings.owner, "reverse", tag))
    try:
        await wait_healthy(started)
        assert await exchange(started.address, "stressed") == "desserts"
    finally:
        await runtime.stop(started.handle)


async def test_broken_requirements_fail_the_build_and_leave_nothing(
    runtime: DockerRuntime, settings: ControlPlaneSettings, docker_client: Any, tmp_path: Path
) -> None:
    folder = make_fn(tmp_path, ECHO_FN, requirements="aube-no-such-package-0d1e2f==1.0\n")
    with pytest.raises(BuildFailed, match="aube-no-such-package-0d1e2f"):
        await runtime.prepare("broken", 1, folder, Manifest(), settings.owner, lambda _: None)
    label = f"{names.LABEL_OWNER}={settings.owner}"
    assert docker_client.images.list(all=True, filters={"label": label}) == []
    assert docker_client.containers.list(all=True, filters={"label": label}) == []
    assert await runtime.artifacts(settings.owner) == []


async def test_failed_docker_build_leaves_no_image(
    runtime: DockerRuntime, settings: ControlPlaneSettings, docker_client: Any, tmp_path: Path
) -> None:
    # A build that fails inside the engine after a layer was made: the labelled intermediate image goes too.
    runtime_tag = await runtime.ensure_images(lambda _: None)
    owner_label = f"{names.LABEL_OWNER}={settings.owner}"
    context = tmp_path / "context"
    context.mkdir()
    (context / "present").write_text("x")
    (context / "Dockerfile").write_text(
        f"FROM {runtime_tag}\nLABEL {owner_label}\nCOPY present /opt/present\nCOPY missing /opt/missing\n"
    )
    lines: list[str] = []
    with pytest.raises(BuildFailed, match="missing"):
        await anyio.to_thread.run_sync(
            lambda: images.build_image(
                docker_client,
                context,
                names.image_tag(settings.owner, "badcopy", 1),
                lines.append,
                60.0,
                failure_filters={"label": [owner_label]},
            )
        )
    assert any("Step 3/4" in line for line in lines)  # the first COPY made a layer before the failure
    assert docker_client.images.list(all=True, filters={"label": owner_label}) == []
    assert docker_client.containers.list(all=True, filters={"label": owner_label}) == []


async def test_start_failures_leave_no_container(
    runtime: DockerRuntime, settings: ControlPlaneSettings, docker_client: Any
) -> None:
    with pytest.raises(RuntimeFailure, match="does not exist"):
        await runtime.start(spec_for(settings.owner, "ghost", "aube-test-no-such-image:v1"))
    bad_limits = Manifest(limits=LimitsSection(memory="lots"))
    with pytest.raises(RuntimeFailure):
        await runtime.start(spec_for(settings.owner, "ghost", "aube-test-no-such-image:v1", bad_limits))
    label = f"{names.LABEL_OWNER}={settings.owner}"
    assert docker_client.containers.list(all=True, filters={"label": label}) == []
    assert await runtime.instances(settings.owner) == []


def _iptables(*args: str, tool: str = "iptables") -> str:
    return subprocess.run([tool, "-w", "5", *args], capture_output=True, text=True, check=True).stdout


async def test_instance_network_and_host_rules_are_made_once(
    runtime: DockerRuntime, settings: ControlPlaneSettings, docker_client: Any
) -> None:
    bridge = settings.instance_bridge
    info = docker_client.api.inspect_network(settings.instance_network)
    assert info["Options"] == {
        "com.docker.network.bridge.enable_icc": "false",
        "com.docker.network.bridge.name": bridge,
    }
    assert info["Labels"] == {names.LABEL_MANAGED: "true"}
    assert info["EnableIPv6"] is False
    chain = names.firewall_chain(bridge)
    for tool, ipv6 in (("iptables", False), ("ip6tables", True)):
        assert instancenet.listed_rules(chain, _iptables("-S", chain, tool=tool)) == instancenet.chain_rules(ipv6)
        jumps = [line for line in _iptables("-S", "INPUT", tool=tool).splitlines() if chain in line]
        assert jumps == [f"-A INPUT -i {bridge} -j {chain}"]
    # First in INPUT, so no broader rule before it can accept what it rejects.
    assert _iptables("-S", "INPUT").splitlines()[1] == f"-A INPUT -i {bridge} -j {chain}"

    # A second control plane (or a restart) finds everything in place and adds nothing.
    again = await DockerRuntime.connect(settings)
    await again.close()
    assert [line for line in _iptables("-S", "INPUT").splitlines() if chain in line] == [
        f"-A INPUT -i {bridge} -j {chain}"
    ]
    # Rules someone changed are put back as they should be.
    _iptables("-F", chain)
    _iptables("-A", chain, "-j", "ACCEPT")
    again = await DockerRuntime.connect(settings)
    await again.close()
    assert instancenet.listed_rules(chain, _iptables("-S", chain)) == instancenet.chain_rules(False)

    # Control planes starting at the same moment: each rewrite is one commit, so the chain ends up exactly right.
    _iptables("-D", "INPUT", "-i", bridge, "-j", chain)
    _iptables("-F", chain)
    _iptables("-X", chain)
    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(anyio.to_thread.run_sync, instancenet.install_firewall, bridge)
    assert instancenet.listed_rules(chain, _iptables("-S", chain)) == instancenet.chain_rules(False)
    jumps = {line for line in _iptables("-S", "INPUT").splitlines() if chain in line}
    assert jumps == {f"-A INPUT -i {bridge} -j {chain}"}  # maybe twice after such a race: harmless


async def test_a_network_that_is_not_aubes_is_refused(settings: ControlPlaneSettings, docker_client: Any) -> None:
    # A network of that name made by someone else (here: with containers free to talk to each other).
    foreign = docker_client.api.create_network(
        settings.instance_network, driver="bridge", labels={names.LABEL_TEST: "1"}
    )
    try:
        with pytest.raises(RuntimeFailure, match=r"not Aube's.*enable_icc"):
            await DockerRuntime.connect(settings)
    finally:
        docker_client.api.remove_network(foreign["Id"])


async def test_without_iptables_the_runtime_refuses_to_start_unless_told(
    settings: ControlPlaneSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(instancenet.FirewallError, match=r"iptables is not installed.*AUBE_INSTANCE_FIREWALL=off"):
        await DockerRuntime.connect(settings)
    # Turned off by the operator: it starts, and says loudly what that means.
    runtime = await DockerRuntime.connect(msgspec_replace(settings, instance_firewall=False))
    await runtime.close()
