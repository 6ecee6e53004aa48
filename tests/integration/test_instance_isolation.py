"""Instances are reachable by the platform only (issue 8, finding 6), on the real Docker engine.

The whole platform runs as real processes (control plane, proxy, nats-server); the attacks come from inside a running
instance container (`docker exec`, as the instance's own user) and from the host's loopback, as a function or a local
client would try them: another instance's container address, the host's ports through the bridge gateway, another
instance's published port, and a stream opened on an instance without the instance credential or with a forged one.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from nats.aio.client import Client as NATS
from support import nats_client, wait_http, zip_base64
from websockets.asyncio.client import connect

from aube.shared import names
from aube.shared.bus import request
from aube.shared.natsserver import free_port
from aube.shared.registry import Registry
from aube.shared.schemas import InstanceRecord, UploadReply, UploadRequest

pytestmark = [pytest.mark.anyio, pytest.mark.docker]

REPO = Path(__file__).resolve().parents[2]
WHOAMI = REPO / "examples" / "whoami"
SECRET_HEADER = names.HEADER_INSTANCE_SECRET

# A function that tells its client what it can see: its request's headers and its environment, its own and pid 1's.
INSPECTOR_FN = """\
import json
import os


async def fn(websocket):
    async for message in websocket:
        if message == "headers":
            await websocket.send(json.dumps(list(websocket.request.headers.raw_items())))
        else:
            with open("/proc/1/environ", "rb") as f:
                pid1 = f.read().decode(errors="replace")
            await websocket.send(json.dumps({"environ": dict(os.environ), "pid1": pid1}))
"""

# Run inside an instance container: connect to each target and, where a connection opens, ask for a WebSocket stream.
PROBE = r"""
import json, socket, sys
found = {}
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((host, int(port)))
    except OSError as e:
        found[target] = "refused: " + type(e).__name__
        continue
    try:
        s.sendall(b"GET /beta HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        found[target] = "open: " + s.recv(200).decode("latin-1").split("\r\n")[0]
    except OSError as e:
        found[target] = "open: " + type(e).__name__
    finally:
        s.close()
print(json.dumps(found))
"""


@pytest.fixture
def runtime_kind(docker_client: Any) -> str:
    """Docker only: the process runtime's isolation is another helper's (network namespaces)."""
    return "docker"


async def upload(nc: NATS, name: str, folder: Path) -> UploadReply:
    return await request(nc, names.SUBJECT_UPLOAD, UploadRequest(name=name, zip=zip_base64(folder)), UploadReply, 300)


async def free_instance(registry: Registry, function: str) -> tuple[str, InstanceRecord]:
    with anyio.fail_after(60):
        while True:
            for entry in await registry.instances(function):
                if entry.record.state == "free":
                    return entry.key, entry.record
            await anyio.sleep(0.1)


def start_proxy(platform: Any, host: str) -> int:
    port = free_port(host)
    platform.start("aube.proxy", AUBE_PROXY_PORT=str(port), AUBE_PROXY_HOST=host, AUBE_PROXY_ID=f"proxy-{port}")
    return port


async def raw_status(address: str, head: str) -> int:
    host, _, port = address.rpartition(":")
    async with await anyio.connect_tcp(host, int(port)) as stream:
        await stream.send(head.encode("latin-1"))
        answer = b""
        with anyio.fail_after(10):
            while b"\r\n" not in answer:
                answer += await stream.receive()
    return int(answer.split(b" ", 2)[1])


def upgrade(path: str = "/beta", *extra: str) -> str:
    lines = [f"GET {path} HTTP/1.1", "Host: x", "Upgrade: websocket", "Connection: Upgrade"]
    lines += ["Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13", *extra]
    return "\r\n".join(lines) + "\r\n\r\n"


def inspector(tmp_path: Path) -> Path:
    folder = tmp_path / "inspector"
    folder.mkdir()
    (folder / "fn.py").write_text(INSPECTOR_FN)
    return folder


def host_address(interface: str) -> str:
    """The host's IPv4 address on `interface` (the default bridge's: another address of the host, not the gateway)."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", interface], capture_output=True, text=True).stdout
    return out.split()[3].split("/")[0]


def exec_probe(docker_client: Any, container: str, targets: list[str]) -> dict[str, str]:
    exec_id = docker_client.api.exec_create(container, ["python3", "-c", PROBE, *targets])["Id"]
    output = docker_client.api.exec_start(exec_id).decode()
    result: dict[str, str] = json.loads(output.strip().splitlines()[-1])
    return result


async def test_an_instance_reaches_no_other_instance_and_no_host_port(
    platform: Any, docker_client: Any, tmp_path: Path
) -> None:
    # Published on every host address (an operator's choice for proxies on other machines): the worst case for
    # an instance that dials another's published port through the host.
    await platform.start_controlplane(AUBE_PUBLISH_HOST="0.0.0.0")
    proxy_port = start_proxy(platform, "0.0.0.0")
    await wait_http(proxy_port)
    # Anything else listening on the host, as NATS or a metrics endpoint would.
    with socket.create_server(("0.0.0.0", 0)) as listener:
        listener_port = listener.getsockname()[1]
        async with nats_client(platform.nats_url) as (nc, registry):
            await upload(nc, "alpha", WHOAMI)
            await upload(nc, "beta", inspector(tmp_path))
            _, alpha = await free_instance(registry, "alpha")
            beta_key, beta = await free_instance(registry, "beta")
            alpha_net = next(
                iter(docker_client.api.inspect_container(alpha.handle)["NetworkSettings"]["Networks"].values())
            )
            beta_net = next(
                iter(docker_client.api.inspect_container(beta.handle)["NetworkSettings"]["Networks"].values())
            )
            gateway = alpha_net["Gateway"]
            default_bridge = host_address("docker0")
            beta_published = beta.address.rpartition(":")[2]
            targets = {
                "another instance": f"{beta_net['IPAddress']}:8080",
                "the proxy through the gateway": f"{gateway}:{proxy_port}",
                "a host port through the gateway": f"{gateway}:{listener_port}",
                "a host port through another bridge's address": f"{default_bridge}:{listener_port}",
                "another instance's published port": f"{gateway}:{beta_published}",
                "another instance's published port through another host address": f"{default_bridge}:{beta_published}",
                "the proxy through another host address": f"{default_bridge}:{proxy_port}",
            }
            started = time.monotonic()
            found = await anyio.to_thread.run_sync(exec_probe, docker_client, alpha.handle, list(targets.values()))
            reached = {
                what: found[target] for what, target in targets.items() if not found[target].startswith("refused")
            }
            assert reached == {}
            # The host refuses at once (REJECT); only the engine's drop between containers makes the probe wait.
            assert time.monotonic() - started < 10

            # Each instance has its own credential: one instance's (were its function to learn it) opens no other.
            assert alpha.secret and beta.secret and alpha.secret != beta.secret
            assert await raw_status(beta.address, upgrade("/beta", f"{SECRET_HEADER}: {alpha.secret}")) == 403

            # Untouched: still free in the registry, and the next real client gets it through the proxy.
            got = await registry.get_instance(beta_key)
            assert got is not None
            assert (got.record.state, got.record.streams_served) == ("free", beta.streams_served)
            async with connect(f"ws://127.0.0.1:{proxy_port}/beta", proxy=None, open_timeout=30) as ws:
                await ws.send("headers")
                with anyio.fail_after(10):
                    assert isinstance(await ws.recv(), str)


async def test_only_the_platform_opens_a_stream_on_an_instance(platform: Any, tmp_path: Path) -> None:
    await platform.start_controlplane()
    proxy_port = start_proxy(platform, "127.0.0.1")
    await wait_http(proxy_port)
    async with nats_client(platform.nats_url) as (nc, registry):
        await upload(nc, "beta", inspector(tmp_path))
        key, rec = await free_instance(registry, "beta")
        secret = rec.secret
        assert len(secret) >= 40  # 32 random bytes
        revision = (await registry.get_instance(key)).revision  # type: ignore[union-attr]

        # Straight to the instance's published port (as any local process could): refused before any upgrade.
        digest = hashlib.sha256(secret.encode()).hexdigest()
        for head in (
            upgrade(),
            "GET /_aube/health HTTP/1.1\r\nHost: x\r\n\r\n",
            upgrade(f"/beta?{SECRET_HEADER}={secret}"),
            upgrade("/beta", f"{SECRET_HEADER}: {digest}"),
            upgrade("/beta", f"{SECRET_HEADER}: {secret}", f"{SECRET_HEADER.upper()}: forged"),
        ):
            assert await raw_status(rec.address, head) == 403, head
        # The platform's view did not move: the instance is free, unclaimed, serves the next real client.
        got = await registry.get_instance(key)
        assert got is not None and got.revision == revision and got.record.state == "free"

        # Through the proxy, a client forging the header in several spellings: its copies never arrive and do not
        # override the proxy's (the stream opens), and the function sees neither the header nor the secret.
        forged = [(SECRET_HEADER, "forged"), (SECRET_HEADER.lower(), secret[:-1]), (SECRET_HEADER.upper(), digest)]
        async with connect(
            f"ws://127.0.0.1:{proxy_port}/beta", proxy=None, open_timeout=30, additional_headers=forged
        ) as ws:
            await ws.send("headers")
            with anyio.fail_after(10):
                headers = json.loads(await ws.recv())
            await ws.send("environ")
            with anyio.fail_after(10):
                seen = json.loads(await ws.recv())
        assert [n for n, _ in headers if n.lower() == SECRET_HEADER.lower()] == []
        assert "forged" not in json.dumps(headers) and secret[:-1] not in json.dumps(headers)
        # What a function can read of itself: the credential's hash, never the credential.
        assert secret not in json.dumps(seen)
        assert seen["environ"][names.ENV_INSTANCE_SECRET_SHA256] == digest
        assert f"{names.ENV_INSTANCE_SECRET_SHA256}={digest}" in seen["pid1"]

        # With the credential (what the proxy does) the instance serves: the secret alone is what it checks.
        await free_instance(registry, "beta")
        assert await raw_status(rec.address, upgrade("/beta", f"{SECRET_HEADER.lower()}: {secret}")) == 101
