"""The whole platform as real processes: control plane, proxy replicas and reaper over a real nats-server.

Acceptance of the gateway-and-reaper issue: streams through the proxy on both runtimes, exclusive instances across
replicas under concurrent load, a replica killed with SIGKILL, idle reaping and scale to zero, subprotocols end to
end, hostile clients, and `aube start` brought up and down by signals.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import nats
import pytest
from nats.aio.client import Client as NATS
from support import AubeStart, nats_client, wait_http, zip_base64
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from aube.shared import agentlogins, credentials, names
from aube.shared.bus import request
from aube.shared.schemas import UploadReply, UploadRequest

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


async def upload(nc: NATS, name: str, folder: Path, manifest: str | None = None) -> UploadReply:
    extra = {"aube.toml": manifest} if manifest is not None else None
    body = UploadRequest(name=name, zip=zip_base64(folder, extra))
    return await request(nc, names.SUBJECT_UPLOAD, body, UploadReply, 300)


def ws(port: int, name: str, **kw: object) -> connect:
    return connect(f"ws://127.0.0.1:{port}/{name}", proxy=None, open_timeout=60, **kw)  # type: ignore[arg-type]


async def whoami(conn: ClientConnection, text: str = "x") -> dict[str, object]:
    await conn.send(text)
    reply = await conn.recv()
    assert isinstance(reply, str)
    return json.loads(reply)  # type: ignore[no-any-return]


async def test_streams_through_the_proxy_on_both_runtimes(platform) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane()
    port, _ = await platform.start_proxy()
    await wait_http(port)
    async with nats_client(platform.nats_url) as (nc, _registry):
        await upload(nc, "rev", EXAMPLES / "reverse")
        await upload(nc, "who", EXAMPLES / "whoami")
        async with ws(port, "rev") as conn:
            await conn.send("hello aube")
            assert await conn.recv() == "ebua olleh"
        # Two clients at once get two different instances (the second waits for a scale-out).
        async with ws(port, "who") as a, ws(port, "who") as b:
            first, second = await whoami(a), await whoami(b)
            assert first["instance"] != second["instance"]
            assert first["streams"] == second["streams"] == 1


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_two_replicas_twenty_clients_twenty_distinct_instances(platform) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane()
    ports = [(await platform.start_proxy(AUBE_CLAIM_TIMEOUT="120"))[0] for _ in range(2)]
    for port in ports:
        await wait_http(port)
    async with nats_client(platform.nats_url) as (nc, _registry):
        await upload(nc, "who", EXAMPLES / "whoami", "[scaling]\nmin_free = 2\nmax_instances = 20\n")
        seen: list[dict[str, object]] = []
        all_open = anyio.Event()
        opened = 0

        async def client(i: int) -> None:
            nonlocal opened
            async with ws(ports[i % 2], "who") as conn:
                seen.append(await whoami(conn, f"c{i}"))
                opened += 1
                if opened == 20:
                    all_open.set()
                # Every stream stays open until all twenty are, so they truly overlap.
                with anyio.fail_after(240):
                    await all_open.wait()
                seen.append(await whoami(conn, f"c{i} again"))

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(client, i)
    assert len(seen) == 40
    assert {r["streams"] for r in seen} == {1}, "an instance carried two streams"
    firsts = seen[:20]
    assert len({r["instance"] for r in firsts}) == 20


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_kill_9_of_a_replica_spares_the_other_and_its_claims_come_back(platform) -> None:  # type: ignore[no-untyped-def]
    lease = 2.0
    await platform.start_controlplane()
    platform.start("aube.reaper", AUBE_REAP_INTERVAL="0.2", AUBE_LEASE_TTL=str(lease))
    # Relayed: a handed-off stream outlives its proxy (test_handoff.py); this one is cut with it.
    doomed_port, doomed = await platform.start_proxy(AUBE_LEASE_TTL=str(lease), AUBE_HANDOFF="off")
    healthy_port, _ = await platform.start_proxy(AUBE_LEASE_TTL=str(lease))
    await wait_http(doomed_port)
    await wait_http(healthy_port)
    async with nats_client(platform.nats_url) as (nc, registry):
        await upload(nc, "who", EXAMPLES / "whoami", "[scaling]\nmin_free = 2\nmax_instances = 4\n")
        async with ws(doomed_port, "who") as lost, ws(healthy_port, "who") as kept:
            lost_instance = (await whoami(lost))["instance"]
            assert (await whoami(kept))["streams"] == 1
            doomed.kill9()  # type: ignore[attr-defined]
            killed_at = time.monotonic()
            # The stream on the other replica goes on without error.
            for i in range(5):
                assert (await whoami(kept, f"after {i}"))["echo"] == f"after {i}"
                await anyio.sleep(0.2)
            # The dead replica's client sees its connection end.
            with anyio.fail_after(5), pytest.raises(ConnectionClosed):
                await whoami(lost)
            # Its claim is recycled within twice the lease time.
            with anyio.fail_after(2 * lease + 1):
                while any(
                    e.record.instance_id == lost_instance and e.record.state == "busy"
                    for e in await registry.instances("who")
                ):
                    await anyio.sleep(0.1)
            recycled_after = time.monotonic() - killed_at
            assert recycled_after <= 2 * lease + 1
            assert (await whoami(kept, "still"))["echo"] == "still"


async def test_reaper_scales_to_zero_cold_starts_and_never_reaps_a_busy_instance(platform) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane()
    platform.start("aube.reaper", AUBE_REAP_INTERVAL="0.3")
    port, _ = await platform.start_proxy(AUBE_CLAIM_TIMEOUT="120")
    await wait_http(port)
    async with nats_client(platform.nats_url) as (nc, registry):
        reply = await upload(nc, "idle", EXAMPLES / "whoami", "[scaling]\nmin_free = 0\nidle_timeout = 2\n")
        assert reply.instances == 0
        assert await registry.instances("idle") == []
        # The first stream waits for a cold start, then works.
        async with ws(port, "idle") as conn:
            instance = (await whoami(conn))["instance"]
            # Held well past idle_timeout: a busy instance is never reaped.
            for i in range(6):
                await anyio.sleep(0.75)
                assert await whoami(conn, str(i)) == {"instance": instance, "streams": 1, "echo": str(i)}
        # Free again, it is reaped after idle_timeout: the function is back to zero instances.
        with anyio.fail_after(30):
            while await registry.instances("idle"):
                await anyio.sleep(0.2)
        async with ws(port, "idle") as conn:
            assert (await whoami(conn))["instance"] != instance


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_subprotocol_is_negotiated_with_the_function(platform, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fn = tmp_path / "chat"
    fn.mkdir()
    (fn / "fn.py").write_text(
        'subprotocols = ["chat.v2", "chat.v1"]\n\n'
        "async def fn(websocket):\n"
        "    async for message in websocket:\n"
        "        await websocket.send(f'{websocket.subprotocol}:{message}')\n"
    )
    await platform.start_controlplane()
    port, _ = await platform.start_proxy()
    await wait_http(port)
    async with nats_client(platform.nats_url) as (nc, _registry):
        await upload(nc, "chat", fn)
        async with ws(port, "chat", subprotocols=["chat.v1", "chat.v2"]) as conn:
            assert conn.subprotocol == "chat.v2"
            await conn.send("hi")
            assert await conn.recv() == "chat.v2:hi"
        with pytest.raises(InvalidStatus):
            async with ws(port, "chat", subprotocols=["other"]):
                pass


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_hostile_clients_do_not_stop_the_proxy(platform) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane()
    port, _ = await platform.start_proxy(AUBE_HEAD_TIMEOUT="1", AUBE_MAX_HEAD_BYTES="4096")
    await wait_http(port)

    async def raw(data: bytes, *, slow: bool = False) -> bytes:
        async with await anyio.connect_tcp("127.0.0.1", port) as s:
            if slow:
                # A slow loris: a few bytes of a head, then silence; the proxy must give up on it (408).
                for byte in data[:3]:
                    await s.send(bytes([byte]))
                    await anyio.sleep(0.2)
            else:
                await s.send(data)
            out = b""
            with anyio.move_on_after(10):
                try:
                    while True:
                        out += await s.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                    pass
            return out

    async with nats_client(platform.nats_url) as (nc, _registry):
        await upload(nc, "rev", EXAMPLES / "reverse-async")
        cases = {
            "garbage": raw(os.urandom(512) + b"\r\n\r\n"),
            "plain GET": raw(b"GET /rev HTTP/1.1\r\nHost: x\r\n\r\n"),
            "oversized head": raw(b"GET /rev HTTP/1.1\r\nX-Big: " + b"a" * 10000 + b"\r\n\r\n"),
            "slow head": raw(b"GET /rev HTTP/1.1\r\nHost: x\r\n\r\n", slow=True),
        }
        for case, pending in cases.items():
            answer = await pending
            assert answer.startswith(b"HTTP/1.1 4"), (case, answer[:80])
            async with ws(port, "rev") as conn:
                await conn.send(case)
                assert await conn.recv() == case[::-1]


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_aube_start_runs_everything_and_ctrl_c_stops_it(platform, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # The real deploy/nats.conf (accounts included), on free ports; its store lands in tmp_path.
    start = AubeStart(tmp_path, platform.env(), proxies=2)
    env, conf, proxy_port, operator_base = start.env, start.conf, start.proxy_port, start.operator_base
    try:
        await wait_http(proxy_port, timeout=60)
        # The first start keeps the new deployer credentials in the user's config folder too (AubeStart points
        # XDG_CONFIG_HOME into tmp_path), where the CLI finds them from any folder.
        kept = tmp_path / "config" / "aube" / "credentials.env"
        assert credentials.load_login(kept) == credentials.load_login(tmp_path / ".data/credentials.env") is not None
        assert f"credentials are also in {kept}" in start.output()
        # upload.sh finds the deployer's password where `aube start` created it.
        upload_env = {**env, "AUBE_PYTHON": sys.executable, "AUBE_CREDENTIALS": str(tmp_path / ".data/credentials.env")}
        deployed = subprocess.run(
            [str(REPO / "scripts" / "upload.sh"), str(EXAMPLES / "reverse"), "rev"],
            env=upload_env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert deployed.returncode == 0, deployed.stderr
        for _ in range(4):  # both replicas (SO_REUSEPORT spreads connections) serve the function
            async with ws(proxy_port, "rev") as conn:
                await conn.send("abc")
                assert await conn.recv() == "cba"
        # Each replica has its own operator port for its metrics; the public port has none.
        scraped = 0
        for port in (operator_base, operator_base + 1):
            await wait_http(port)
            async with await anyio.connect_tcp("127.0.0.1", port) as s:
                await s.send(b"GET /_aube/metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                answer = b""
                with anyio.fail_after(10):
                    while b"aube_relayed_bytes_total" not in answer:
                        answer += await s.receive()
                scraped += answer.count(b'aube_claims_total{function="rev",result="claimed"}')
        assert scraped >= 1
        async with await anyio.connect_tcp("127.0.0.1", proxy_port) as s:
            await s.send(b"GET /_aube/metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert b" 404 " in await s.receive()
        # The control plane and the reaper each have an operator port of their own.
        for port, family in ((start.controlplane_operator_port, b"aube_builds_total"),
                             (start.reaper_operator_port, b"aube_reap_passes_total")):  # fmt: skip
            await wait_http(port)
            async with await anyio.connect_tcp("127.0.0.1", port) as s:
                await s.send(b"GET /_aube/metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                answer = b""
                with anyio.fail_after(10), contextlib.suppress(anyio.EndOfStream):
                    while True:
                        answer += await s.receive()
            assert answer.startswith(b"HTTP/1.1 200 ") and family in answer
        # The operator adds a tenant to the running platform; it deploys under its own name, not over the deployer's.
        added = subprocess.run(
            [sys.executable, "-m", "aube.cli", "tenant", "add", "alice", "--nats-conf", str(conf)],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert added.returncode == 0 and "nats-server reloaded" in added.stdout, added.stderr
        alice_env = {**upload_env, "AUBE_CREDENTIALS": str(tmp_path / ".data/tenants/alice.env")}

        def upload_as_alice(name: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [str(REPO / "scripts" / "upload.sh"), str(EXAMPLES / "reverse"), name],
                env=alice_env, capture_output=True, text=True, timeout=300,
            )  # fmt: skip

        taken = upload_as_alice("rev")
        assert taken.returncode == 1 and "name_taken" in taken.stderr, taken.stderr
        assert upload_as_alice("alice-rev").returncode == 0
        async with ws(proxy_port, "alice-rev") as conn:
            await conn.send("xyz")
            assert await conn.recv() == "zyx"

        # The operator adds a host: its agent's own login, which works once the running server has reloaded.
        def aube_host(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "aube.cli", "host", *argv, "--nats-conf", str(conf)],
                env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
            )  # fmt: skip

        added = aube_host("add", "edge-1")
        assert added.returncode == 0 and "nats-server reloaded" in added.stdout, added.stderr
        again = aube_host("add", "edge-1")
        assert again.returncode == 1 and "exists already" in again.stderr
        agent = dict(line.split("=", 1) for line in (tmp_path / ".data/hosts/edge-1.env").read_text().splitlines())
        assert agent["AUBE_HOST_ID"] == "edge-1" and agent["AUBE_NATS_USER"] == "aube-agent-edge-1"
        nc = await nats.connect(
            start.nats_url,
            user=agent["AUBE_NATS_USER"],
            password=agent["AUBE_NATS_PASSWORD"],
            inbox_prefix=agentlogins.inbox_prefix("edge-1"),
        )
        try:
            await nc.subscribe(names.host_subject("edge-1", "start"))
            await nc.flush()
        finally:
            await nc.close()
        # Ctrl-C in a terminal: SIGINT to the whole foreground process group, not just the supervisor.
        assert start.interrupt() == 0
    finally:
        start.close()
    assert "[aube] stopped" in start.output()
    for port in (operator_base, operator_base + 1, start.controlplane_operator_port, start.reaper_operator_port):
        assert f"http://127.0.0.1:{port}/_aube/metrics" in start.output()
    # Nothing outlives the platform: the Platform fixture's teardown fails on any instance of this owner.


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_a_function_with_tokens_opens_streams_only_for_their_bearers(platform) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    await platform.start_controlplane()
    port, _ = await platform.start_proxy()
    await wait_http(port)
    digest = hashlib.sha256(b"let-me-in").hexdigest()
    async with nats_client(platform.nats_url) as (nc, _registry):
        await upload(nc, "private", EXAMPLES / "reverse-async", f'[access]\ntokens_sha256 = ["{digest}"]\n')
        for refused in ({}, {"additional_headers": {"Authorization": "Bearer wrong"}}):
            with pytest.raises(InvalidStatus) as e:
                async with ws(port, "private", **refused):
                    pass
            assert e.value.response.status_code == 401
        async with ws(port, "private", additional_headers={"Authorization": "Bearer let-me-in"}) as conn:
            await conn.send("header")
            assert await conn.recv() == "redaeh"
        async with ws(port, "private?access_token=let-me-in") as conn:  # browsers cannot set headers
            await conn.send("query")
            assert await conn.recv() == "yreuq"
