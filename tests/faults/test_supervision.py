"""Faults under `aube start`: real processes killed with real signals (the reliability issue).

A crashed service is restarted while the rest keep running; the other proxy replica's streams are not cut.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import nats
import pytest
from support import REPO, AubeStart, connection_owner, wait_http
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from aube.shared import credentials
from aube.shared.registry import Registry

pytestmark = pytest.mark.anyio


def listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds a listening TCP socket on `port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    try:
        return any(os.readlink(fd) in inodes for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


async def exchange(conn: ClientConnection, text: str) -> None:
    await conn.send(text)
    reply = json.loads(await conn.recv())
    assert reply["echo"] == text


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_kill_9_of_one_proxy_spares_the_other_replicas_streams_and_it_serves_again(
    platform, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    start = AubeStart(tmp_path, platform.env(), proxies=2)
    streams: list[tuple[ClientConnection, int | None]] = []
    try:
        await wait_http(start.proxy_port)
        upload_env = {**start.env, "AUBE_CREDENTIALS": str(tmp_path / ".data/credentials.env")}
        folder = tmp_path / "whoami"
        folder.mkdir()
        (folder / "fn.py").write_text((REPO / "examples" / "whoami" / "fn.py").read_text())
        (folder / "aube.toml").write_text("[scaling]\nmin_free = 4\nmax_instances = 20\n")
        deployed = subprocess.run(
            [sys.executable, "-m", "aube.cli", "deploy", str(folder), "who"],
            env=upload_env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )  # fmt: skip
        assert deployed.returncode == 0, deployed.stderr

        proxy_pids = start.pids("proxy-1") + start.pids("proxy-2")
        # SO_REUSEPORT spreads connections over the replicas: open streams until both carry some.
        with anyio.fail_after(120):
            while len({owner for _, owner in streams}) < 2 or len(streams) < 6:
                conn = await connect(f"ws://127.0.0.1:{start.proxy_port}/who", proxy=None, open_timeout=30)
                await exchange(conn, "hello")
                owner = connection_owner(conn.local_address[1], start.proxy_port, proxy_pids)
                streams.append((conn, owner))
                assert len(streams) < 20, "connections never reached both replicas"
        (victim,) = start.pids("proxy-1")
        survivors = [c for c, owner in streams if owner != victim]
        killed_at = time.monotonic()
        os.kill(victim, 9)

        # The other replica's streams carry on without an error; the killed replica's are gone.
        for round_ in range(10):
            for conn in survivors:
                await exchange(conn, f"after-{round_}")
            await anyio.sleep(0.2)
        for conn, owner in streams:
            if owner == victim:
                with pytest.raises(ConnectionClosed):
                    await exchange(conn, "x")

        # The platform stays up and proxy-1 serves again, as a new process on the port.
        with anyio.fail_after(30):
            while not (len(start.pids("proxy-1")) == 2 and listens(start.pids("proxy-1")[1], start.proxy_port)):
                assert start.proc.poll() is None, start.output()[-3000:]
                await anyio.sleep(0.05)
        back_after = time.monotonic() - killed_at
        print(f"proxy-1 serving again {back_after:.2f}s after kill -9")
        assert back_after < 5

        # Its former instances come back to the pool once its lease expires (TTL 6 s): within two TTLs.
        login = credentials.platform_secrets(tmp_path / ".data").service_login("controlplane")
        nc = await nats.connect(start.env["AUBE_NATS_URL"], user=login.user, password=login.password)
        try:
            registry = await Registry.open(nc.jetstream())
            with anyio.fail_after(2 * 6 + 8):
                while sum(e.record.state == "busy" for e in await registry.instances("who")) != len(survivors):
                    await anyio.sleep(0.2)
            print(f"former instances free again {time.monotonic() - killed_at:.2f}s after kill -9")
            assert time.monotonic() - killed_at < 2 * 6 + 2
        finally:
            await nc.close()
        for conn in survivors:
            await exchange(conn, "still here")
        for conn, _ in streams:
            await conn.close()
        assert start.interrupt() == 0
        assert "[aube] stopped" in start.output()
    finally:
        start.close()
