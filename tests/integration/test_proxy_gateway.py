"""The proxy end to end: a real nats-server, real proxy replicas (in-process `serve()` or `python -m aube.proxy`),
registry entries written through the Registry API, and real instance servers (`python -m aube.instance`).

The control plane is not running here: a stop request has no responder (the proxy must log and carry on), and
where a test needs scale requests answered, it subscribes to the scale subject itself and starts a real instance.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest
from anyio.abc import Process
from nats.aio.client import Client as NATS
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from aube.proxy.service import serve
from aube.shared import names
from aube.shared.natsserver import LocalNatsServer, free_port
from aube.shared.registry import Registry
from aube.shared.schemas import (
    FunctionRecord,
    InstanceRecord,
    LimitsSection,
    Manifest,
    ScaleReply,
    ScaleRequest,
    ScalingSection,
    decode,
    encode,
)
from aube.shared.settings import ProxySettings

pytestmark = pytest.mark.anyio

# The operator endpoints answer only a Host that is an address, localhost or the operator host.
METRICS_GET = b"GET /_aube/metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
METRICS_POST = b"POST /_aube/metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """uvloop, as `python -m aube.proxy` runs: the relay's transports are uvloop's in production."""
    import uvloop

    return "asyncio", {"loop_factory": uvloop.new_event_loop}


ROOT = Path(__file__).resolve().parents[2]
REVERSE = ROOT / "examples" / "reverse"
WHOAMI = ROOT / "examples" / "whoami"


# -- real instance servers -------------------------------------------------------------------------------------


class Instance:
    def __init__(self, fn_dir: Path, instance_id: str) -> None:
        self.id = instance_id
        self.port = free_port()
        env = {
            **os.environ,
            "AUBE_FN_DIR": str(fn_dir),
            "AUBE_INSTANCE_HOST": "127.0.0.1",
            "AUBE_INSTANCE_PORT": str(self.port),
            "AUBE_INSTANCE_ID": instance_id,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aube.instance"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def ready(self) -> None:
        with anyio.fail_after(30):
            while True:
                assert self.proc.poll() is None, "instance server exited"
                try:
                    stream = await anyio.connect_tcp("127.0.0.1", self.port)
                except OSError:
                    await anyio.sleep(0.05)
                    continue
                await stream.aclose()
                return

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def instance_servers(fn_dir: Path, count: int) -> Iterator[list[Instance]]:
    started: list[Instance] = []
    try:
        for _ in range(count):
            started.append(Instance(fn_dir, f"i-{uuid.uuid4().hex[:8]}"))
        yield started
    finally:
        for inst in started:
            inst.stop()


# -- registry ------------------------------------------------------------------------------------------------


class Env:
    def __init__(self, nc: NATS, registry: Registry) -> None:
        self.nc = nc
        self.registry = registry

    async def add_function(
        self, name: str, *, version: int = 1, scaling: ScalingSection | None = None, limits: LimitsSection | None = None
    ) -> FunctionRecord:
        manifest = Manifest(scaling=scaling or ScalingSection(min_free=0), limits=limits or LimitsSection())
        now = time.time()
        rec = FunctionRecord(
            name=name,
            version=version,
            manifest=manifest,
            artifact="test",
            runtime="process",
            created_at=now,
            updated_at=now,
        )
        got = await self.registry.get_function(name)
        assert await self.registry.put_function(rec, None if got is None else got.revision) is not None
        return rec

    async def add_instance(self, name: str, slot: int, inst: Instance | None, *, address: str = "") -> str:
        if inst is not None:
            await inst.ready()
        rec = InstanceRecord(
            function=name,
            slot=slot,
            instance_id=inst.id if inst else f"gone-{slot}",
            version=1,
            state="free",
            runtime="process",
            owner="test",
            address=inst.address if inst else address,
            created_at=time.time(),
        )
        assert await self.registry.create_instance(rec) is not None
        return names.instance_key(name, slot)

    async def record(self, key: str) -> InstanceRecord:
        got = await self.registry.get_instance(key)
        assert got is not None
        return got.record

    async def wait_state(self, key: str, state: str) -> InstanceRecord:
        with anyio.fail_after(15):
            while True:
                rec = await self.record(key)
                if rec.state == state:
                    return rec
                await anyio.sleep(0.05)


@asynccontextmanager
async def environment(server: LocalNatsServer) -> AsyncIterator[Env]:
    nc = await nats.connect(server.url)
    try:
        yield Env(nc, await Registry.open(nc.jetstream()))
    finally:
        await nc.close()


def proxy_settings(server: LocalNatsServer, **overrides: Any) -> ProxySettings:
    base: dict[str, Any] = {
        "nats_url": server.url,
        "proxy_host": "127.0.0.1",
        "proxy_port": 0,
        "proxy_id": f"p-{uuid.uuid4().hex[:8]}",
        "claim_timeout": 3.0,
        "head_timeout": 1.0,
        "connect_timeout": 2.0,
        "scale_cooldown": 0.5,
        "max_head_bytes": 4096,
        "operator_port": free_port(),
    }
    base.update(overrides)
    return ProxySettings(**base)


@asynccontextmanager
async def running_proxy(settings: ProxySettings) -> AsyncIterator[int]:
    async with anyio.create_task_group() as tg:
        port: int = await tg.start(serve, settings)
        yield port
        tg.cancel_scope.cancel()


async def raw_request(port: int, data: bytes, *, pause: float = 0.0, half_close: bool = False) -> bytes:
    """Send `data` (optionally then wait, or half-close), read the answer until the proxy closes."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(data)
        if half_close:
            await stream.send_eof()
        if pause:
            await anyio.sleep(pause)
        chunks = []
        with anyio.fail_after(10):
            try:
                while True:
                    chunks.append(await stream.receive())
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
        return b"".join(chunks)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


async def reverse_roundtrip(port: int, name: str = "reverse") -> None:
    async with connect(f"ws://127.0.0.1:{port}/{name}", proxy=None) as ws:
        await ws.send("hello")
        assert await ws.recv() == "olleh"


# -- tests ---------------------------------------------------------------------------------------------------


async def test_reversed_echo_then_release_to_free(nats_server: LocalNatsServer) -> None:
    settings = proxy_settings(nats_server)
    with instance_servers(REVERSE, 1) as (inst,):
        async with environment(nats_server) as env:
            await env.add_function("reverse")
            key = await env.add_instance("reverse", 0, inst)
            async with running_proxy(settings) as port:
                before = time.time()
                async with connect(f"ws://127.0.0.1:{port}/reverse?lang=en", proxy=None) as ws:
                    await ws.send("hello world")
                    assert await ws.recv() == "dlrow olleh"
                    busy = await env.record(key)
                    assert (busy.state, busy.claimed_by) == ("busy", settings.proxy_id)
                rec = await env.wait_state(key, "free")
                assert rec.claimed_by is None
                assert rec.last_used >= before
                assert rec.streams_served == 1
                assert settings.operator_port is not None
                metrics = (await raw_request(settings.operator_port, METRICS_GET)).decode()
                assert 'aube_claims_total{function="reverse",result="claimed"} 1' in metrics
                assert 'aube_relayed_bytes_total{direction="client_to_instance"}' in metrics
                assert "aube_claim_latency_seconds_count 1" in metrics


async def test_two_clients_get_two_instances(nats_server: LocalNatsServer) -> None:
    with instance_servers(WHOAMI, 2) as insts:
        async with environment(nats_server) as env:
            await env.add_function("whoami")
            for slot, inst in enumerate(insts):
                await env.add_instance("whoami", slot, inst)
            async with running_proxy(proxy_settings(nats_server)) as port:
                url = f"ws://127.0.0.1:{port}/whoami"
                async with connect(url, proxy=None) as a, connect(url, proxy=None) as b:
                    await a.send("a")
                    await b.send("b")
                    ra, rb = json.loads(await a.recv()), json.loads(await b.recv())
                assert ra["instance"] != rb["instance"]
                assert {ra["instance"], rb["instance"]} == {i.id for i in insts}
                assert ra["streams"] == rb["streams"] == 1


async def test_refusals_before_upgrade_and_service_goes_on(nats_server: LocalNatsServer) -> None:
    upgrade = (
        "GET /{} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with instance_servers(REVERSE, 1) as (inst,):
        async with environment(nats_server) as env:
            await env.add_function("reverse")
            await env.add_function("empty")  # min_free 0, no instance, nobody answers scale requests
            await env.add_instance("reverse", 0, inst)
            settings = proxy_settings(nats_server, claim_timeout=1.0)
            assert settings.operator_port is not None
            async with running_proxy(settings) as port:
                assert status_of(await raw_request(port, upgrade.format("Bad_Name").encode())) == 400
                assert status_of(await raw_request(port, upgrade.format("nosuchfn").encode())) == 404
                answer = await raw_request(port, upgrade.format("empty").encode())
                assert status_of(answer) == 503
                assert b"\r\nRetry-After: " in answer
                assert status_of(await raw_request(port, b"GET /reverse HTTP/1.1\r\nHost: x\r\n\r\n")) == 426
                health = await raw_request(port, b"GET /_aube/health HTTP/1.1\r\n\r\n", half_close=True)
                assert status_of(health) == 200
                metrics = await raw_request(settings.operator_port, METRICS_GET)
                assert status_of(metrics) == 200
                text = metrics.decode()
                for reason in ("invalid_name", "unknown_function", "no_instance", "not_upgrade"):
                    assert f'aube_handshakes_rejected_total{{reason="{reason}"}} 1' in text
                await reverse_roundtrip(port)


async def test_metrics_are_served_on_the_operator_port_only(nats_server: LocalNatsServer) -> None:
    """Finding 11: /_aube/metrics on the public port named every function, protected ones too. The public port
    now answers 404 there (and serves streams and /_aube/health); the operator port, on loopback, serves the
    metrics and health and nothing else."""
    settings = proxy_settings(nats_server)
    assert settings.operator_port is not None and settings.operator_host == "127.0.0.1"
    with instance_servers(REVERSE, 1) as (inst,):
        async with environment(nats_server) as env:
            await env.add_function("reverse")
            await env.add_instance("reverse", 0, inst)
            async with running_proxy(settings) as port:
                await reverse_roundtrip(port)
                for method in (b"GET", b"HEAD"):
                    public = await raw_request(port, method + b" /_aube/metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert status_of(public) == 404, public
                    assert b"reverse" not in public and b"aube_" not in public
                assert status_of(await raw_request(port, b"GET /_aube/health HTTP/1.1\r\n\r\n")) == 200
                operator = await raw_request(settings.operator_port, METRICS_GET)
                assert status_of(operator) == 200
                assert b'aube_claims_total{function="reverse",result="claimed"} 1' in operator
                assert b'aube_handshakes_rejected_total{reason="not_found"} 2' in operator
                health = await raw_request(settings.operator_port, b"GET /_aube/health HTTP/1.1\r\n\r\n")
                assert status_of(health) == 200
                # The operator port is no second way in: function paths (upgrade or not) are not served there.
                upgrade = (
                    b"GET /reverse HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                )
                assert status_of(await raw_request(settings.operator_port, upgrade)) == 404
                post = await raw_request(settings.operator_port, METRICS_POST)
                assert status_of(post) == 404
                # Loopback only by default: not reachable on the host's other addresses.
                with socket.create_connection(("127.0.0.1", settings.operator_port)):
                    pass
                listening = [
                    line.split()[1]
                    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                    if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == settings.operator_port
                ]
                assert listening == ["0100007F:" + f"{settings.operator_port:04X}"]
                await reverse_roundtrip(port)


async def test_bad_heads_do_not_stop_the_proxy(nats_server: LocalNatsServer) -> None:
    with instance_servers(REVERSE, 1) as (inst,):
        async with environment(nats_server) as env:
            await env.add_function("reverse")
            await env.add_instance("reverse", 0, inst)
            async with running_proxy(proxy_settings(nats_server, head_timeout=1.0, max_head_bytes=4096)) as port:
                # A slow-loris client holds its connection open the whole time; others are served meanwhile.
                async with await anyio.connect_tcp("127.0.0.1", port) as loris:
                    await loris.send(b"GET /reverse HTTP/1.1\r\nHost: x\r\n")
                    assert status_of(await raw_request(port, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03")) == 400
                    await reverse_roundtrip(port)
                    plain = await raw_request(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert status_of(plain) == 400
                    await reverse_roundtrip(port)
                    big = b"GET /reverse HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 8000 + b"\r\n\r\n"
                    assert status_of(await raw_request(port, big)) == 431
                    await reverse_roundtrip(port)
                    # The slow head gets 408 once head_timeout passes.
                    with anyio.fail_after(10):
                        answer = b""
                        try:
                            while True:
                                answer += await loris.receive()
                        except anyio.EndOfStream:
                            pass
                    assert status_of(answer) == 408
                await reverse_roundtrip(port)


async def test_subprotocol_and_extensions_negotiated_end_to_end(nats_server: LocalNatsServer) -> None:
    with instance_servers(REVERSE, 1) as (inst,):
        async with environment(nats_server) as env:
            await env.add_function("reverse")
            await env.add_instance("reverse", 0, inst)
            async with (
                running_proxy(proxy_settings(nats_server)) as port,
                connect(f"ws://127.0.0.1:{port}/reverse", proxy=None, subprotocols=[Subprotocol("chat.v2")]) as ws,
            ):
                assert ws.subprotocol == "chat.v2"
                # The instance's own answer arrives: permessage-deflate was agreed with the function itself.
                assert ws.response is not None
                assert "permessage-deflate" in ws.response.headers.get("Sec-WebSocket-Extensions", "")
                await ws.send("abc" * 1000)
                assert await ws.recv() == "cba" * 1000


async def test_unreachable_instance_is_marked_unhealthy_and_client_served(nats_server: LocalNatsServer) -> None:
    with instance_servers(REVERSE, 1) as (inst,):
        async with environment(nats_server) as env:
            await env.add_function("reverse")
            dead = await env.add_instance("reverse", 0, None, address=f"127.0.0.1:{free_port()}")
            stops = await env.nc.subscribe(names.SUBJECT_STOP_INSTANCE)  # sees the request; does not answer it
            async with running_proxy(proxy_settings(nats_server, claim_timeout=20.0)) as port:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(reverse_roundtrip, port)  # claims the dead one (the only one), then waits
                    rec = await env.wait_state(dead, "unhealthy")
                    assert rec.claimed_by is None
                    body = json.loads((await stops.next_msg(timeout=10)).data)
                    assert (body["name"], body["slot"], body["instance_id"]) == ("reverse", 0, rec.instance_id)
                    await env.add_instance("reverse", 1, inst)  # the waiting client wakes on the watch
                await reverse_roundtrip(port)
            await stops.unsubscribe()


async def test_instance_gets_the_original_head_plus_x_forwarded_for(nats_server: LocalNatsServer) -> None:
    heads: list[bytes] = []
    head = (
        b"GET /raw/sub?q=1&r=%20 HTTP/1.1\r\nHost: example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-Custom: kept\r\n\r\n"
    )

    async def fake_instance(stream: anyio.abc.SocketStream) -> None:
        # Not a function: a socket that records what the proxy sends it and answers with a fixed 101.
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive()
            heads.append(data)
            await stream.send(b"HTTP/1.1 101 Switching Protocols\r\nX-From: instance\r\n\r\nafter")

    async with environment(nats_server) as env, await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        await env.add_function("raw")
        address = f"127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}"
        await env.add_instance("raw", 0, None, address=address)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, fake_instance)
            async with running_proxy(proxy_settings(nats_server)) as port:
                answer = await raw_request(port, head)
            tg.cancel_scope.cancel()
    # After the stream the proxy asks the instance whether its handler has returned (a health request of its own).
    streamed = [h for h in heads if not h.startswith(b"GET /_aube/health ")]
    assert streamed == [head[:-2] + b"X-Forwarded-For: 127.0.0.1\r\n\r\n"]
    assert answer == b"HTTP/1.1 101 Switching Protocols\r\nX-From: instance\r\n\r\nafter"


async def test_instance_death_ends_the_client_stream(nats_server: LocalNatsServer) -> None:
    with instance_servers(REVERSE, 1) as (inst,):
        async with environment(nats_server) as env:
            await env.add_function("reverse")
            await env.add_instance("reverse", 0, inst)
            async with (
                running_proxy(proxy_settings(nats_server)) as port,
                connect(f"ws://127.0.0.1:{port}/reverse", proxy=None) as ws,
            ):
                await ws.send("x1")
                assert await ws.recv() == "1x"
                inst.proc.kill()
                with anyio.fail_after(5), pytest.raises(ConnectionClosed):
                    await ws.recv()


async def test_fresh_per_stream_drains_and_asks_for_a_stop(nats_server: LocalNatsServer) -> None:
    with instance_servers(REVERSE, 1) as (inst,):
        async with environment(nats_server) as env:
            await env.add_function("reverse", scaling=ScalingSection(min_free=0, fresh_per_stream=True))
            key = await env.add_instance("reverse", 0, inst)
            stops = await env.nc.subscribe(names.SUBJECT_STOP_INSTANCE)  # sees the request; does not answer it
            async with running_proxy(proxy_settings(nats_server)) as port:
                await reverse_roundtrip(port)
                rec = await env.wait_state(key, "draining")
                assert rec.claimed_by is None
                msg = await stops.next_msg(timeout=10)
                body = json.loads(msg.data)
                assert (body["name"], body["slot"], body["instance_id"]) == ("reverse", 0, inst.id)
                # Nobody answered that stop request: the proxy carries on serving.
                assert status_of(await raw_request(port, b"GET /_aube/health HTTP/1.1\r\n\r\n")) == 200
            await stops.unsubscribe()


async def test_stream_idle_timeout_closes_a_silent_stream(nats_server: LocalNatsServer) -> None:
    with instance_servers(REVERSE, 1) as (inst,):
        async with environment(nats_server) as env:
            await env.add_function("reverse", limits=LimitsSection(stream_idle_timeout=0.5))
            key = await env.add_instance("reverse", 0, inst)
            async with (
                running_proxy(proxy_settings(nats_server)) as port,
                connect(f"ws://127.0.0.1:{port}/reverse", proxy=None, ping_interval=None) as ws,
            ):
                await ws.send("ab")
                assert await ws.recv() == "ba"
                with anyio.fail_after(10), pytest.raises(ConnectionClosed):
                    await ws.recv()
                await env.wait_state(key, "free")


async def test_cold_start_asks_the_control_plane_once_and_waits(nats_server: LocalNatsServer) -> None:
    """min_free 0 and no instance: the stream waits while one scale request (from two replicas) starts one."""
    with instance_servers(REVERSE, 1) as (inst,):
        async with environment(nats_server) as env:
            await env.add_function("reverse")
            requests: list[ScaleRequest] = []

            async def control_plane_double() -> None:
                # Answers scale requests as the control plane would: a real instance, registered as free.
                sub = await env.nc.subscribe(names.SUBJECT_SCALE)
                async for msg in sub.messages:
                    req = decode(msg.data, ScaleRequest)
                    requests.append(req)
                    if len(requests) == 1:
                        await env.add_instance("reverse", 0, inst)
                    await msg.respond(encode(ScaleReply(name=req.name, total=1)))

            s1 = proxy_settings(nats_server, claim_timeout=20.0, scale_cooldown=30.0)
            s2 = proxy_settings(nats_server, claim_timeout=20.0, scale_cooldown=30.0, proxy_port=0)
            async with anyio.create_task_group() as tg:
                tg.start_soon(control_plane_double)
                await anyio.sleep(0.1)
                async with running_proxy(s1) as p1, running_proxy(s2) as p2, anyio.create_task_group() as clients:
                    clients.start_soon(reverse_roundtrip, p1)
                    clients.start_soon(reverse_roundtrip, p2)
                tg.cancel_scope.cancel()
            assert len(requests) == 1  # the scale intent kept the second replica from asking too
            assert requests[0].name == "reverse"
            assert requests[0].requested_by in (s1.proxy_id, s2.proxy_id)
            intent = await env.registry.get_scale_intent("reverse")
            assert intent is not None and intent.record.proxy_id == requests[0].requested_by
            assert await env.registry.leases() == []  # both proxies stopped; the intent was never a lease


async def test_two_replicas_never_share_an_instance(nats_server: LocalNatsServer) -> None:
    port = free_port()
    clients_n, instances_n = 8, 3
    seen: list[tuple[str, int]] = []
    with instance_servers(WHOAMI, instances_n) as insts:
        async with environment(nats_server) as env:
            await env.add_function("whoami", scaling=ScalingSection(min_free=0, max_instances=instances_n))
            keys = [await env.add_instance("whoami", slot, inst) for slot, inst in enumerate(insts)]
            s1 = proxy_settings(nats_server, proxy_port=port, claim_timeout=30.0)
            s2 = proxy_settings(nats_server, proxy_port=port, claim_timeout=30.0)

            async def client(n: int) -> None:
                async with connect(f"ws://127.0.0.1:{port}/whoami", proxy=None) as ws:
                    for i in range(3):
                        await ws.send(f"{n}-{i}")
                        reply = json.loads(await ws.recv())
                        seen.append((reply["instance"], reply["streams"]))
                        await anyio.sleep(0.01)

            async with running_proxy(s1), running_proxy(s2), anyio.create_task_group() as tg:
                for n in range(clients_n):
                    tg.start_soon(client, n)
            assert len(seen) == clients_n * 3
            assert all(streams == 1 for _, streams in seen), seen
            for key in keys:
                assert (await env.wait_state(key, "free")).claimed_by is None
            served = 0
            for key in keys:
                served += (await env.record(key)).streams_served
            assert served == clients_n


async def test_lease_lives_while_serving_and_shutdown_releases(nats_server: LocalNatsServer) -> None:
    settings = proxy_settings(nats_server, lease_ttl=0.6)
    with instance_servers(REVERSE, 1) as (inst,):
        async with environment(nats_server) as env:
            await env.add_function("reverse")
            key = await env.add_instance("reverse", 0, inst)
            opened = anyio.Event()

            async def hold_stream(port: int) -> None:
                try:
                    async with connect(f"ws://127.0.0.1:{port}/reverse", proxy=None) as ws:
                        await ws.send("ab")
                        assert await ws.recv() == "ba"
                        opened.set()
                        await ws.recv()
                except ConnectionClosed:
                    pass

            async with anyio.create_task_group() as tg:
                port = await tg.start(serve, settings)
                tg.start_soon(hold_stream, port)
                await opened.wait()
                first = {e.key: e.record for e in await env.registry.leases()}[settings.proxy_id]
                await anyio.sleep(0.5)  # more than ttl/3: renewed at least once
                renewed = {e.key: e.record for e in await env.registry.leases()}[settings.proxy_id]
                assert renewed.renewed_at > first.renewed_at
                assert (await env.record(key)).state == "busy"
                tg.cancel_scope.cancel()
            assert settings.proxy_id not in {e.key for e in await env.registry.leases()}
            rec = await env.record(key)
            assert (rec.state, rec.claimed_by) == ("free", None)


@asynccontextmanager
async def proxy_process(server: LocalNatsServer, port: int, proxy_id: str) -> AsyncIterator[Process]:
    """`python -m aube.proxy` configured by AUBE_* variables, once its health endpoint answers."""
    env_vars = {
        **os.environ,
        "AUBE_NATS_URL": server.url,
        "AUBE_PROXY_HOST": "127.0.0.1",
        "AUBE_PROXY_PORT": str(port),
        "AUBE_PROXY_ID": proxy_id,
        "AUBE_LEASE_TTL": "1.5",
        "AUBE_OPERATOR_PORT": str(free_port()),
    }
    proc = await anyio.open_process([sys.executable, "-m", "aube.proxy"], env=env_vars, stdout=None, stderr=None)
    try:
        with anyio.fail_after(30):
            while True:
                assert proc.returncode is None
                try:
                    if status_of(await raw_request(port, b"GET /_aube/health HTTP/1.1\r\n\r\n")) == 200:
                        break
                except OSError:
                    await anyio.sleep(0.1)
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await proc.aclose()


@pytest.mark.slow
async def test_python_dash_m_replica_serves_and_stops_cleanly(nats_server: LocalNatsServer) -> None:
    port = free_port()
    proxy_id = f"p-{uuid.uuid4().hex[:8]}"
    with instance_servers(REVERSE, 1) as (inst,):
        async with environment(nats_server) as env:
            await env.add_function("reverse")
            await env.add_instance("reverse", 0, inst)
            async with proxy_process(nats_server, port, proxy_id) as proc:
                await reverse_roundtrip(port)
                assert proxy_id in {e.key for e in await env.registry.leases()}
                proc.send_signal(signal.SIGTERM)
                with anyio.fail_after(20):
                    assert await proc.wait() == 0
                assert proxy_id not in {e.key for e in await env.registry.leases()}


@pytest.mark.slow
async def test_kill_9_leaves_claim_and_stale_lease_for_the_reaper(nats_server: LocalNatsServer) -> None:
    """A replica killed mid-stream: its client is disconnected, and its lease stops being renewed while the
    claim stays on record, which is exactly what the reaper needs to recycle the instance."""
    port = free_port()
    proxy_id = f"p-{uuid.uuid4().hex[:8]}"
    with instance_servers(REVERSE, 1) as (inst,):
        async with environment(nats_server) as env:
            await env.add_function("reverse")
            key = await env.add_instance("reverse", 0, inst)
            async with (
                proxy_process(nats_server, port, proxy_id) as proc,
                connect(f"ws://127.0.0.1:{port}/reverse", proxy=None) as ws,
            ):
                await ws.send("ab")
                assert await ws.recv() == "ba"
                proc.kill()
                await proc.wait()
                with anyio.fail_after(5), pytest.raises(ConnectionClosed):
                    await ws.recv()
            # A renewal already on the wire when the process died may still land; after one ttl none can.
            await anyio.sleep(1.5)
            lease = {e.key: e.record for e in await env.registry.leases()}[proxy_id]
            assert lease.renewed_at + lease.ttl < time.time()  # left behind, expired: the reaper's cue
            rec = await env.record(key)
            assert (rec.state, rec.claimed_by) == ("busy", proxy_id)


async def test_stream_max_duration_ends_even_a_busy_stream(nats_server: LocalNatsServer) -> None:
    with instance_servers(REVERSE, 1) as (inst,):
        async with environment(nats_server) as env:
            await env.add_function("reverse", limits=LimitsSection(stream_max_duration=1.0))
            key = await env.add_instance("reverse", 0, inst)
            async with (
                running_proxy(proxy_settings(nats_server)) as port,
                connect(f"ws://127.0.0.1:{port}/reverse", proxy=None) as ws,
            ):

                async def chatter() -> None:
                    while True:  # never idle: only the duration limit can end it
                        await ws.send("ab")
                        assert await ws.recv() == "ba"
                        await anyio.sleep(0.05)

                with anyio.fail_after(15), pytest.raises(ConnectionClosed):
                    await chatter()
            await env.wait_state(key, "free")


async def metric(settings: ProxySettings, line: str) -> int:
    assert settings.operator_port is not None
    text = (await raw_request(settings.operator_port, METRICS_GET)).decode()
    found = [int(float(m.rsplit(" ", 1)[1])) for m in text.splitlines() if m.startswith(line + " ")]
    return found[0] if found else 0


async def test_waiting_clients_are_served_first_come_first_served_without_a_stampede(
    nats_server: LocalNatsServer,
) -> None:
    """Reliability finding 9: every waiting client raced for every instance that turned free. Now each free instance
    is offered to one client, the one waiting longest: in order, and with one replica, no claim race is lost."""
    settings = proxy_settings(nats_server, claim_timeout=60.0, scale_cooldown=30.0)
    with instance_servers(WHOAMI, 1) as (inst,):
        async with environment(nats_server) as env:
            await env.add_function("one", scaling=ScalingSection(min_free=0, max_instances=1))
            await env.add_instance("one", 0, inst)
            async with running_proxy(settings) as port:
                url = f"ws://127.0.0.1:{port}/one"
                served: list[int] = []
                holder = await connect(url, proxy=None)
                await holder.send("hold")
                await holder.recv()

                async def client(n: int) -> None:
                    async with connect(url, proxy=None, open_timeout=60) as ws:
                        served.append(n)
                        await ws.send(str(n))
                        await ws.recv()

                async with anyio.create_task_group() as tg:
                    for n in range(8):
                        tg.start_soon(client, n)
                        await anyio.sleep(0.15)  # a defined arrival order
                    await holder.close()
                assert served == list(range(8))
                # One claim written; each next client then got the instance its predecessor's replica kept.
                claimed = await metric(settings, 'aube_claims_total{function="one",result="claimed"}')
                reserved = await metric(settings, 'aube_claims_total{function="one",result="reserved"}')
                assert claimed + reserved == 9
                assert await metric(settings, 'aube_claims_total{function="one",result="lost_race"}') == 0


async def test_an_instance_that_answers_busy_is_set_aside_and_the_client_served_by_another(
    nats_server: LocalNatsServer,
) -> None:
    """Free in the registry but busy in fact (here: a connection the platform did not make): its own 503 never
    reaches the client, who gets the next instance; the busy one is not handed out again while busy."""
    settings = proxy_settings(nats_server, claim_timeout=30.0, scale_cooldown=30.0, handler_grace=1.0)
    with instance_servers(WHOAMI, 2) as (taken, spare):
        async with environment(nats_server) as env:
            await env.add_function("who", scaling=ScalingSection(min_free=0, max_instances=2))
            taken_key = await env.add_instance("who", 0, taken)
            async with connect(f"ws://{taken.address}/who", proxy=None) as squatter, running_proxy(settings) as port:
                await squatter.send("x")
                await squatter.recv()
                async with anyio.create_task_group() as tg:

                    async def add_spare_once_busy_was_met() -> None:
                        with anyio.fail_after(20):
                            while (
                                await metric(settings, 'aube_claims_total{function="who",result="instance_busy"}') < 1
                            ):
                                await anyio.sleep(0.05)
                        await env.add_instance("who", 1, spare)

                    tg.start_soon(add_spare_once_busy_was_met)
                    async with connect(f"ws://127.0.0.1:{port}/who", proxy=None, open_timeout=30) as ws:
                        await ws.send("hi")
                        assert json.loads(await ws.recv())["instance"] == spare.id
                # Still busy after the handler grace: never handed to a client again, recycled instead.
                await env.wait_state(taken_key, "unhealthy")
                assert await metric(settings, 'aube_claims_total{function="who",result="instance_busy"}') == 1


@pytest.mark.parametrize("engine", ["native", "python"])
async def test_relay_engines_carry_large_messages_both_ways_and_count_them(
    nats_server: LocalNatsServer, engine: str
) -> None:
    """Both relay engines (AUBE_RELAY_ENGINE): the stream's bytes pass intact, the metrics name the engine that moved
    them and count the bytes, and the instance goes back to the pool. `native` fails where the engine is not built."""
    settings = proxy_settings(nats_server, relay_engine=engine)
    text = os.urandom(300_000).hex()  # 600 kB: over one read of either engine
    with instance_servers(REVERSE, 1) as (inst,):
        async with environment(nats_server) as env:
            await env.add_function("reverse")
            key = await env.add_instance("reverse", 0, inst)
            async with running_proxy(settings) as port:
                async with connect(f"ws://127.0.0.1:{port}/reverse", proxy=None, max_size=None, compression=None) as ws:
                    for _ in range(3):
                        await ws.send(text)
                        assert await ws.recv() == text[::-1]
                await env.wait_state(key, "free")
                assert await metric(settings, f'aube_streams_relayed_total{{engine="{engine}"}}') == 1
                relayed_in = await metric(settings, 'aube_relayed_bytes_total{direction="client_to_instance"}')
                relayed_out = await metric(settings, 'aube_relayed_bytes_total{direction="instance_to_client"}')
                assert relayed_in > 3 * len(text) and relayed_out > 3 * len(text)


async def test_the_first_frame_in_the_heads_packet_crosses_the_hand_over_to_the_native_engine(
    nats_server: LocalNatsServer,
) -> None:
    """A client that sends its first frame in the same write as its request head: those bytes are read by the event
    loop before the instance answers and must reach the instance, in order, before what the engine relays after."""
    settings = proxy_settings(nats_server, relay_engine="native")
    key_b64 = base64.b64encode(os.urandom(16)).decode()
    head = (
        "GET /reverse HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key_b64}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()

    def masked_text(text: str) -> bytes:
        payload, mask = text.encode(), os.urandom(4)
        return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

    with instance_servers(REVERSE, 1) as (inst,):
        async with environment(nats_server) as env:
            await env.add_function("reverse")
            await env.add_instance("reverse", 0, inst)
            async with running_proxy(settings) as port, await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(head + masked_text("first"))
                answer = b""
                with anyio.fail_after(10):
                    while answer.count(b"tsrif") == 0:
                        answer += await stream.receive()
                    assert answer.startswith(b"HTTP/1.1 101")
                    await stream.send(masked_text("second"))  # after the hand-over: the engine's
                    while b"dnoces" not in answer:
                        answer += await stream.receive()
                assert answer.index(b"tsrif") < answer.index(b"dnoces")
                assert await metric(settings, 'aube_streams_relayed_total{engine="native"}') == 1


async def test_a_stream_the_engine_lets_go_of_by_itself_ends_its_supervision() -> None:
    """The engine ending a stream with neither side's word (its sockets could not be watched, the engine stopped)
    ends the stream's supervision: it is not waited on for ever, nor in a loop that never yields."""
    from aube.proxy.native_relay import NativeLegs, NativeRelay
    from aube.proxy.streams import Streams

    relay = NativeRelay(asyncio.get_running_loop())
    client, leg = socket.socketpair()
    try:
        with open(os.devnull, "rb") as not_a_socket:  # epoll refuses it: the engine lets go at once
            legs = NativeLegs(relay.engine.start(leg.detach(), os.dup(not_a_socket.fileno())))
        relay.carried[legs.pump.id] = legs
        with anyio.fail_after(10):
            reason = await Streams._relay(Streams.__new__(Streams), legs, idle=60.0, longest=None)
        assert reason == "relay_failed"
    finally:
        client.close()
        relay.shutdown()
