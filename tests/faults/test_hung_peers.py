"""Hung peers (the reliability issue, finding 8): a stream whose peer is gone ends within a bounded time.

Real parts: a real nats-server, the proxy as a real process (`python -m aube.proxy`, configured by AUBE_*
variables), real instance servers (`python -m aube.instance`) and real WebSocket clients in their own processes.
Registry entries are written through the Registry API (no control plane: a stop request has no responder).

Two kinds of gone, detected by different means:
- A client whose host vanished (no ACKs at all): a client in a network namespace the test creates, reached over a
  veth pair, then cut off with iptables DROP inside that namespace. TCP keepalive ends a quiet stream,
  TCP_USER_TIMEOUT one where data waits. The namespace (and its rules) is removed at teardown.
- A process that hangs while its kernel still answers (SIGSTOP): keepalive cannot see it. With `[limits]
  ping_interval` the instance pings the client, so a stopped client ends the stream at the instance, and a stopped
  instance, whose pings stop, is ended by the proxy (and marked unhealthy). Without the policy the stream stays.

Each runs twice: relayed (AUBE_HANDOFF=off) and handed off (the instance serves the client's own socket; the
instance ends a silent client's stream at the ping bound, the proxy judges a silent instance by its heartbeat), and
checks which of the two its stream took (the claim's `handed_off` flag).

Each test prints the measured time from the fault to the stream's end (pytest -s shows it).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import nats
import pytest
from support import nats_client, zip_base64
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from aube.shared import names
from aube.shared.bus import request
from aube.shared.natsserver import LocalNatsServer, free_port
from aube.shared.registry import Registry
from aube.shared.schemas import (
    FunctionRecord,
    InstanceRecord,
    LimitsSection,
    Manifest,
    ScalingSection,
    UploadReply,
    UploadRequest,
)

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
REVERSE = ROOT / "examples" / "reverse"

# A client in its own process: one exchange, then it holds the stream open (never pinging: only the platform may).
CLIENT = """
import asyncio, sys
from websockets.asyncio.client import connect

async def main():
    async with connect(sys.argv[1], proxy=None, ping_interval=None, open_timeout=10) as ws:
        await ws.send("hello")
        print("reply", (await ws.recv())[:20], flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""

# After the first message, a tick every 0.2 s: the proxy always has data for the client.
TICKER = """
import asyncio

async def fn(websocket):
    await websocket.recv()
    while True:
        await websocket.send("tick " * 200)
        await asyncio.sleep(0.2)
"""

# Short timers for the proxy where a test is not about the defaults: a dead client ends in about 4 s.
FAST_TCP = {
    "AUBE_TCP_KEEPALIVE_IDLE": "2",
    "AUBE_TCP_KEEPALIVE_INTERVAL": "1",
    "AUBE_TCP_KEEPALIVE_COUNT": "3",
    "AUBE_TCP_USER_TIMEOUT": "4",
}


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUBE_")}
    env.update(extra)
    return env


class Instance:
    """`python -m aube.instance` on loopback TCP, or on a Unix socket in `socket_dir` (as sandboxed process
    instances serve); `ping` is the policy as the runtimes pass it (AUBE_PING_*). With `handoff_dir` it also takes
    handoffs on a socket there, with an instance credential (`secret`) as the runtimes give it."""

    def __init__(
        self,
        fn_dir: Path,
        ping: tuple[float, float] | None = None,
        socket_dir: str | None = None,
        handoff_dir: str | None = None,
    ) -> None:
        self.id = f"i-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.socket = f"{socket_dir}/{self.id}.sock" if socket_dir else ""
        self.handoff = f"{handoff_dir}/{self.id}.handoff" if handoff_dir else ""
        self.secret = secrets.token_hex(16) if handoff_dir else ""
        extra = {
            "AUBE_FN_DIR": str(fn_dir),
            "AUBE_INSTANCE_HOST": "127.0.0.1",
            "AUBE_INSTANCE_PORT": str(self.port),
            "AUBE_INSTANCE_SOCKET": self.socket,
            "AUBE_INSTANCE_ID": self.id,
            "AUBE_INSTANCE_HANDOFF": self.handoff,
        }
        if self.secret:
            extra["AUBE_INSTANCE_SECRET_SHA256"] = hashlib.sha256(self.secret.encode()).hexdigest()
        if ping is not None:
            extra[names.ENV_PING_INTERVAL], extra[names.ENV_PING_TIMEOUT] = (f"{v:g}" for v in ping)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aube.instance"], env=_clean_env(**extra), stdout=subprocess.DEVNULL
        )

    async def ready(self) -> None:
        with anyio.fail_after(30):
            while True:
                assert self.proc.poll() is None, "instance server exited"
                try:
                    if self.socket:
                        stream: anyio.abc.ByteStream = await anyio.connect_unix(self.socket)
                    else:
                        stream = await anyio.connect_tcp("127.0.0.1", self.port)
                except OSError:
                    await anyio.sleep(0.05)
                    continue
                await stream.aclose()
                return

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process would hold SIGTERM until continued
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Rig:
    """The registry (through a NATS connection of the test's), the proxy process, and what the test started."""

    def __init__(self, server: LocalNatsServer, tmp: Path, registry: Registry, mode: str) -> None:
        self.server = server
        self.tmp = tmp
        self.registry = registry
        self.mode = mode  # "relay" or "handoff": how the proxy carries the streams
        self.instances: list[Instance] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self.socket_dir: str | None = None

    async def function(
        self, fn_dir: Path, limits: LimitsSection, ping: tuple[float, float] | None = None, *, unix: bool = False
    ) -> str:
        """Register function "f" with one free instance; the instance's registry key."""
        handoff = self.mode == "handoff"
        if (unix or handoff) and self.socket_dir is None:
            self.socket_dir = tempfile.mkdtemp(prefix="aube-hung-")  # short: a socket path fits in 107 bytes
        inst = Instance(fn_dir, ping, self.socket_dir if unix else None, self.socket_dir if handoff else None)
        self.instances.append(inst)
        now = time.time()
        manifest = Manifest(scaling=ScalingSection(min_free=0, max_instances=1), limits=limits)
        fn = FunctionRecord(
            name="f", version=1, manifest=manifest, artifact="test", runtime="process", created_at=now, updated_at=now
        )
        assert await self.registry.put_function(fn, None) is not None
        await inst.ready()
        rec = InstanceRecord(
            function="f",
            slot=0,
            instance_id=inst.id,
            version=1,
            state="free",
            runtime="process",
            owner="test",
            address=f"unix:{inst.socket}" if unix else f"127.0.0.1:{inst.port}",
            created_at=now,
            secret=inst.secret,
            handoff=inst.handoff,
        )
        assert await self.registry.create_instance(rec) is not None
        return names.instance_key("f", 0)

    @asynccontextmanager
    async def proxy(self, host: str = "127.0.0.1", **env: str) -> AsyncIterator[int]:
        port = free_port(host)
        log = (self.tmp / f"proxy-{port}.log").open("ab")
        extra = {
            "AUBE_NATS_URL": self.server.url,
            "AUBE_PROXY_HOST": host,
            "AUBE_PROXY_PORT": str(port),
            "AUBE_PROXY_ID": f"p-{secrets.token_hex(4)}",
            "AUBE_REUSE_PORT": "false",
            "AUBE_OPERATOR_PORT": str(free_port()),
            "AUBE_LOG_LEVEL": "DEBUG",
            "AUBE_HANDOFF": "auto" if self.mode == "handoff" else "off",
            # A stream's end is read off its claim's release (`seconds_until_not_busy`): nothing is kept after it
            # (proxy/reserve.py keeps relayed and handed-off streams' instances alike).
            "AUBE_RESERVE_SECONDS": "0",
            **env,
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "aube.proxy"], env=_clean_env(**extra), stdout=log, stderr=subprocess.STDOUT
        )
        try:
            with anyio.fail_after(30):
                while True:
                    assert proc.poll() is None, "proxy exited"
                    try:
                        async with await anyio.connect_tcp(host, port) as s:
                            await s.send(b"GET /_aube/health HTTP/1.1\r\nHost: x\r\n\r\n")
                            if b" 200 " in await s.receive():
                                break
                    except (OSError, anyio.EndOfStream):
                        await anyio.sleep(0.1)
            yield port
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            print(f"----- proxy log (last lines) -----\n{(self.tmp / f'proxy-{port}.log').read_text()[-3000:]}")

    def client(self, url: str, netns: str | None = None) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-c", CLIENT, url]
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        proc = subprocess.Popen(argv, env=_clean_env(), stdout=subprocess.PIPE)
        self.processes.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()  # SIGKILL ends a stopped process too
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        for inst in self.instances:
            inst.stop()
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    async def state(self, key: str) -> str:
        got = await self.registry.get_instance(key)
        assert got is not None
        return got.record.state

    async def carried_as_asked(self, key: str) -> None:
        """The busy claim at `key` is handed off exactly when this rig hands off (the stream did not fall back). The
        proxy flags the claim once the instance took the socket: a first exchange may come before it."""
        with anyio.fail_after(5):
            while True:
                got = await self.registry.get_instance(key)
                assert got is not None and got.record.state == "busy"
                if got.record.handed_off == (self.mode == "handoff"):
                    return
                await anyio.sleep(0.05)

    async def seconds_until_not_busy(self, key: str, limit: float) -> float:
        """From now until the proxy lets go of the instance (its stream ended), at most `limit`."""
        began = time.monotonic()
        with anyio.move_on_after(limit):
            while await self.state(key) == "busy":
                await anyio.sleep(0.1)
            return time.monotonic() - began
        return float("inf")


@pytest.fixture(params=["relay", "handoff"])
async def rig(nats_server: LocalNatsServer, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    nc = await nats.connect(nats_server.url)
    p = Rig(nats_server, tmp_path, await Registry.open(nc.jetstream()), request.param)
    try:
        yield p
    finally:
        p.close()
        await nc.close()


async def replied(proc: subprocess.Popen[bytes]) -> None:
    """Wait for the client's first reply line (its stream is up, through the proxy)."""
    assert proc.stdout is not None
    with anyio.fail_after(20):
        line = await anyio.to_thread.run_sync(proc.stdout.readline)
    assert line.startswith(b"reply "), line


async def wait_busy(rig: Rig, key: str) -> None:
    with anyio.fail_after(10):
        while await rig.state(key) != "busy":
            await anyio.sleep(0.05)
    await rig.carried_as_asked(key)


# -- a client whose host vanished --------------------------------------------------------------------------------


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@contextmanager
def client_namespace() -> Iterator[tuple[str, str]]:
    """A network namespace joined to this one by a veth pair: (namespace, the host side's address)."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables") is None:
        pytest.skip("needs root, ip (iproute2) and iptables for a network namespace")
    tag = secrets.token_hex(3)
    ns, host_if, ns_if = f"aube-hung-{tag}", f"ahh{tag}", f"ahn{tag}"
    net = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}"
    try:
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        _run("ip", "addr", "add", f"{net}.1/30", "dev", host_if)
        _run("ip", "link", "set", host_if, "up")
        _run("ip", "-n", ns, "addr", "add", f"{net}.2/30", "dev", ns_if)
        _run("ip", "-n", ns, "link", "set", ns_if, "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        yield ns, f"{net}.1"
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)  # takes the rules and veth along
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=30)  # already gone normally


def cut_off(ns: str) -> None:
    """The namespace's host goes silent: every packet in or out is dropped, nothing is refused."""
    _run("ip", "netns", "exec", ns, "iptables", "-A", "INPUT", "-j", "DROP")
    _run("ip", "netns", "exec", ns, "iptables", "-A", "OUTPUT", "-j", "DROP")


async def test_a_quiet_stream_to_a_vanished_client_host_ends_by_keepalive(rig: Rig) -> None:
    with client_namespace() as (ns, host):
        key = await rig.function(REVERSE, LimitsSection())
        async with rig.proxy(host, **FAST_TCP) as port:
            client = rig.client(f"ws://{host}:{port}/f", netns=ns)
            await replied(client)
            await wait_busy(rig, key)
            cut_off(ns)
            took = await rig.seconds_until_not_busy(key, 15)
            print(f"quiet stream, client host cut off: ended after {took:.1f}s (keepalive 2+1x3, user timeout 4)")
            assert took < 12
            assert await rig.state(key) == "free"  # the instance is fine: it serves the next client


async def test_a_stream_with_data_for_a_vanished_client_host_ends_by_user_timeout(rig: Rig, tmp_path: Path) -> None:
    ticker = tmp_path / "ticker"
    ticker.mkdir()
    (ticker / "fn.py").write_text(TICKER)
    with client_namespace() as (ns, host):
        key = await rig.function(ticker, LimitsSection())
        async with rig.proxy(host, **FAST_TCP) as port:
            client = rig.client(f"ws://{host}:{port}/f", netns=ns)
            await replied(client)
            await wait_busy(rig, key)
            cut_off(ns)
            took = await rig.seconds_until_not_busy(key, 15)
            print(f"ticking stream, client host cut off: ended after {took:.1f}s (user timeout 4)")
            assert took < 12


async def test_with_the_default_settings_a_vanished_client_host_ends_within_half_a_minute(rig: Rig) -> None:
    with client_namespace() as (ns, host):
        key = await rig.function(REVERSE, LimitsSection())
        async with rig.proxy(host) as port:
            client = rig.client(f"ws://{host}:{port}/f", netns=ns)
            await replied(client)
            await wait_busy(rig, key)
            cut_off(ns)
            took = await rig.seconds_until_not_busy(key, 36)
            print(f"defaults (keepalive 10+5x3, user timeout 20), client host cut off: ended after {took:.1f}s")
            assert took < 32


# -- processes that hang while their kernel still answers ------------------------------------------------------

PING = (1.0, 1.0)  # interval, timeout
SLACK = 3.0


def ping_limits() -> LimitsSection:
    return LimitsSection(ping_interval=PING[0], ping_timeout=PING[1])


async def test_a_stopped_client_process_is_ended_by_the_instances_pings(rig: Rig) -> None:
    key = await rig.function(REVERSE, ping_limits(), ping=PING)
    async with rig.proxy() as port:
        client = rig.client(f"ws://127.0.0.1:{port}/f")
        await replied(client)
        await wait_busy(rig, key)
        await anyio.sleep(2.5)  # pings answered meanwhile: a live client's stream stays
        assert await rig.state(key) == "busy"
        client.send_signal(signal.SIGSTOP)
        took = await rig.seconds_until_not_busy(key, 15)
        print(f"client SIGSTOPped, ping {PING[0]:g}/{PING[1]:g}: ended after {took:.1f}s")
        assert took < sum(PING) + SLACK
        assert await rig.state(key) == "free"  # the instance was never at fault


@pytest.mark.parametrize("leg", ["tcp", "unix"])
async def test_a_stopped_instance_is_ended_by_the_proxy_when_its_pings_stop(rig: Rig, leg: str) -> None:
    key = await rig.function(REVERSE, ping_limits(), ping=PING, unix=leg == "unix")
    async with rig.proxy() as port:
        async with connect(f"ws://127.0.0.1:{port}/f", proxy=None, ping_interval=None) as ws:
            await ws.send("hello")
            assert await ws.recv() == "olleh"
            await rig.carried_as_asked(key)
            await anyio.sleep(2.5)  # a live instance that only pings is not silent
            await ws.send("still")
            assert await ws.recv() == "llits"
            rig.instances[0].proc.send_signal(signal.SIGSTOP)
            began = time.monotonic()
            with anyio.fail_after(15), pytest.raises(ConnectionClosed):
                await ws.recv()
            took = time.monotonic() - began
        print(f"instance ({leg}) SIGSTOPped, ping {PING[0]:g}/{PING[1]:g}: client saw the end after {took:.1f}s")
        assert took < sum(PING) + SLACK
        with anyio.fail_after(5):
            while await rig.state(key) != "unhealthy":  # never handed to the next client
                await anyio.sleep(0.1)


# An `async def fn` that blocks its event loop after one reply: its process runs (threads included), its pings stop.
BLOCKER = """
import time

async def fn(websocket):
    await websocket.recv()
    await websocket.send("blocking")
    time.sleep(60)
"""


async def test_a_function_blocking_its_event_loop_is_judged_hung(rig: Rig, tmp_path: Path) -> None:
    """Only the event loop stops (the instance server's other threads run on): a handed-off instance answers the
    proxy's heartbeat only while its stream's server sends (it pings), as the relay judges the bytes it sends."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "fn.py").write_text(BLOCKER)
    key = await rig.function(blocker, ping_limits(), ping=PING)
    async with rig.proxy() as port, connect(f"ws://127.0.0.1:{port}/f", proxy=None, ping_interval=None) as ws:
        await ws.send("hello")
        assert await ws.recv() == "blocking"
        began = time.monotonic()
        await rig.carried_as_asked(key)
        with anyio.fail_after(15), pytest.raises(ConnectionClosed):
            await ws.recv()
        took = time.monotonic() - began
        print(f"event loop blocked, ping {PING[0]:g}/{PING[1]:g}: client saw the end after {took:.1f}s")
        assert took < sum(PING) + SLACK
        with anyio.fail_after(5):
            while await rig.state(key) != "unhealthy":  # never handed to the next client
                await anyio.sleep(0.1)


async def test_without_the_ping_policy_a_stopped_instance_keeps_its_stream(rig: Rig) -> None:
    key = await rig.function(REVERSE, LimitsSection())
    async with rig.proxy() as port, connect(f"ws://127.0.0.1:{port}/f", proxy=None, ping_interval=None) as ws:
        await ws.send("hello")
        assert await ws.recv() == "olleh"
        await rig.carried_as_asked(key)
        rig.instances[0].proc.send_signal(signal.SIGSTOP)
        with anyio.move_on_after(sum(PING) + SLACK + 2):
            await ws.recv()
            pytest.fail("the stream ended though no policy asked for it")
        assert await rig.state(key) == "busy"
        rig.instances[0].proc.send_signal(signal.SIGCONT)
        await ws.send("again")
        assert await ws.recv() == "niaga"  # it was only paused: nothing was cut


# A function that writes as fast as it can: a client that stops reading fills every buffer on the way.
FLOOD = """
async def fn(websocket):
    await websocket.recv()
    chunk = "x" * 65536
    while True:
        await websocket.send(chunk)
"""


async def test_an_instance_held_up_by_a_client_that_stops_reading_is_not_judged_hung(rig: Rig, tmp_path: Path) -> None:
    """The proxy stops reading the instance while the client leg is full: the instance's silence is then the
    client's doing. The instance's own pings end such a stream (the client cannot answer behind its backlog), and
    the instance goes back to the pool, not to "unhealthy"."""
    flood = tmp_path / "flood"
    flood.mkdir()
    (flood / "fn.py").write_text(FLOOD)
    key = await rig.function(flood, ping_limits(), ping=PING)
    async with rig.proxy() as port:
        client = rig.client(f"ws://127.0.0.1:{port}/f")  # reads one message, then nothing
        await replied(client)
        await wait_busy(rig, key)
        took = await rig.seconds_until_not_busy(key, 30)
        print(f"client stopped reading a flood, ping {PING[0]:g}/{PING[1]:g}: ended after {took:.1f}s")
        assert took < 30
        assert await rig.state(key) == "free"


# -- end to end: aube.toml -> control plane -> runtime -> instance ----------------------------------------------


# The platform's own runtimes: the proxy relays, or hands the client's socket to the instance (the default).
MODES = pytest.mark.parametrize("mode", ["relay", "handoff"])


async def carried_as_asked(registry: Registry, function: str, mode: str) -> None:
    """The function's one busy claim is handed off exactly in "handoff" mode (flagged once the instance took it)."""
    with anyio.fail_after(5):
        while [e.record.handed_off for e in await registry.instances(function) if e.record.state == "busy"] != [
            mode == "handoff"
        ]:
            await anyio.sleep(0.05)


@MODES
async def test_the_manifests_ping_policy_reaches_the_instance_through_the_control_plane(
    platform: Any, tmp_path: Path, mode: str
) -> None:
    """Deployed with `[limits] ping_interval`, a real control plane starts the instance with the policy: a stopped
    client's stream ends within the policy's bound (without pings nothing would end it)."""
    await platform.start_controlplane()
    port = free_port()
    platform.start(
        "aube.proxy",
        AUBE_PROXY_HOST="127.0.0.1",
        AUBE_PROXY_PORT=str(port),
        AUBE_PROXY_ID=f"proxy-{port}",
        AUBE_OPERATOR_PORT=str(free_port()),
        AUBE_HANDOFF="auto" if mode == "handoff" else "off",
        AUBE_RESERVE_SECONDS="0",  # the stream's end is read off its claim's release: nothing kept after it
    )
    async with nats_client(platform.nats_url) as (nc, registry):
        policy = f"ping_interval = {PING[0]:g}\nping_timeout = {PING[1]:g}\n"
        manifest = f"[scaling]\nmin_free = 1\nmax_instances = 2\n[limits]\n{policy}"
        body = UploadRequest(name="rev", zip=zip_base64(REVERSE, {"aube.toml": manifest}))
        await request(nc, names.SUBJECT_UPLOAD, body, UploadReply, 300)
        client = subprocess.Popen([sys.executable, "-c", CLIENT, f"ws://127.0.0.1:{port}/rev"], stdout=subprocess.PIPE)
        try:
            with anyio.fail_after(60):
                while True:  # the proxy may not have seen the function yet: the client then gets a 404 and exits
                    assert client.stdout is not None
                    line = await anyio.to_thread.run_sync(client.stdout.readline)
                    if line.startswith(b"reply "):
                        break
                    client.wait()
                    client.stdout.close()
                    await anyio.sleep(0.2)
                    client = subprocess.Popen(
                        [sys.executable, "-c", CLIENT, f"ws://127.0.0.1:{port}/rev"], stdout=subprocess.PIPE
                    )

            async def busy() -> int:
                return sum(e.record.state == "busy" for e in await registry.instances("rev"))

            with anyio.fail_after(10):
                while await busy() != 1:
                    await anyio.sleep(0.05)
            await carried_as_asked(registry, "rev", mode)
            client.send_signal(signal.SIGSTOP)
            began = time.monotonic()
            with anyio.fail_after(15):
                while await busy():
                    await anyio.sleep(0.1)
            took = time.monotonic() - began
            print(
                f"{platform.runtime} runtime, client SIGSTOPped, ping {PING[0]:g}/{PING[1]:g}: ended after {took:.1f}s"
            )
            assert took < sum(PING) + SLACK
        finally:
            client.kill()
            client.wait()
            if client.stdout is not None:
                client.stdout.close()


async def test_both_tcp_legs_carry_keepalive(rig: Rig) -> None:
    """What the kernel shows for the proxy's sockets: a keepalive timer on the client leg and the TCP instance leg."""
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2)")
    key = await rig.function(REVERSE, LimitsSection())
    inst = rig.instances[0]
    async with (
        rig.proxy(**FAST_TCP) as port,
        connect(f"ws://127.0.0.1:{port}/f", proxy=None, ping_interval=None) as ws,
    ):
        await ws.send("hello")
        assert await ws.recv() == "olleh"
        await wait_busy(rig, key)

        def timers(selector: str) -> str:
            argv = ["ss", "-tnoH", "state", "established", selector]
            return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout

        # While a segment waits for its ACK the kernel shows the retransmission timer instead: look again then.
        # A handed-off client's socket keeps the options the proxy set on it; there is no instance leg then.
        relayed = rig.mode == "relay"
        with anyio.fail_after(5):
            while True:
                client_leg = timers(f"( sport = :{port} )")  # the proxy's end of the client's connection
                instance_leg = timers(f"( dport = :{inst.port} )")  # the proxy's connection to the instance
                if "timer:(keepalive" in client_leg and ("timer:(keepalive" in instance_leg) == relayed:
                    break
                await anyio.sleep(0.2)
        print(f"client leg: {client_leg.strip()}\ninstance leg: {instance_leg.strip()}")


def _pids_of_instance(instance_id: str) -> list[int]:
    """Processes started for one instance (process runtime): every one whose environment names it, and every
    process of the pid namespaces those are in (but the host's). A server forked from a zygote shows the zygote's
    environment, not its own, and its parent is the control plane (a subreaper), but it lives in the sandbox's pid
    namespace."""
    marker = f"{names.ENV_INSTANCE_ID}={instance_id}".encode()
    host_ns = os.readlink("/proc/self/ns/pid")
    found: set[int] = set()
    namespaces: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                namespaces[int(entry.name)] = os.readlink(entry / "ns" / "pid")
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.add(int(entry.name))
            except OSError:
                continue
    sandboxes = {namespaces[pid] for pid in found if pid in namespaces} - {host_ns}
    found |= {pid for pid, ns in namespaces.items() if ns in sandboxes}
    return sorted(found)


def hang(runtime: str, instance_id: str, handle: str) -> None:
    """The instance's processes stop running; its host's kernel still answers TCP."""
    if runtime == "docker":
        _run("docker", "pause", handle)  # the cgroup freezer: every process of the container stops
        return
    pids = _pids_of_instance(instance_id)
    assert pids, f"no process of instance {instance_id} found"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)


@MODES
async def test_a_hung_instance_is_ended_stopped_and_never_served_again(platform: Any, mode: str) -> None:
    """A deployed function with a ping policy: its instance hangs mid-stream (SIGSTOP, or `docker pause`). The
    client's stream ends within the policy's bound, the control plane stops that instance, and the next client is
    served by another one."""
    await platform.start_controlplane()
    port = free_port()
    platform.start(
        "aube.proxy",
        AUBE_PROXY_HOST="127.0.0.1",
        AUBE_PROXY_PORT=str(port),
        AUBE_PROXY_ID=f"proxy-{port}",
        AUBE_OPERATOR_PORT=str(free_port()),
        AUBE_HANDOFF="auto" if mode == "handoff" else "off",
    )
    url = f"ws://127.0.0.1:{port}/who"
    async with nats_client(platform.nats_url) as (nc, registry):
        policy = f"ping_interval = {PING[0]:g}\nping_timeout = {PING[1]:g}\n"
        manifest = f"[scaling]\nmin_free = 1\nmax_instances = 3\n[limits]\n{policy}"
        body = UploadRequest(name="who", zip=zip_base64(ROOT / "examples" / "whoami", {"aube.toml": manifest}))
        await request(nc, names.SUBJECT_UPLOAD, body, UploadReply, 300)
        with anyio.fail_after(60):
            while True:  # until the proxy has seen the function
                try:
                    ws = await connect(url, proxy=None, ping_interval=None, open_timeout=30).__aenter__()
                    break
                except Exception:  # a 404 before the proxy's view has the function
                    await anyio.sleep(0.2)
        try:
            await ws.send("x")
            hung_id = json.loads(await ws.recv())["instance"]
            await carried_as_asked(registry, "who", mode)
            entry = next(e for e in await registry.instances("who") if e.record.instance_id == hung_id)
            hang(platform.runtime, hung_id, entry.record.handle)
            began = time.monotonic()
            with anyio.fail_after(15), pytest.raises(ConnectionClosed):
                await ws.recv()
            took = time.monotonic() - began
        finally:
            await ws.close()
        print(f"{platform.runtime} runtime, instance hung: the client saw the end after {took:.1f}s")
        assert took < sum(PING) + SLACK
        with anyio.fail_after(60):  # stopped by the control plane, not left for the next client
            while any(e.record.instance_id == hung_id for e in await registry.instances("who")):
                await anyio.sleep(0.2)
        gone = time.monotonic() - began
        print(f"{platform.runtime} runtime, hung instance out of the registry after {gone:.1f}s")
        async with connect(url, proxy=None, open_timeout=60) as ws:
            await ws.send("y")
            assert json.loads(await ws.recv())["instance"] != hung_id
