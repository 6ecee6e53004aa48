"""Socket handoff (issue 11, item 1) on the whole platform as real processes: control plane with the process runtime
(sandboxed instances on Unix sockets; the round trip on Docker too), proxy replicas, reaper, over a real nats-server.

A stream through a handoff round-trips while the proxy's relayed-bytes counter stays still (the proxy is out of the
data path); AUBE_HANDOFF=off relays as before; a local process on the handoff socket without the instance credential
is refused; the idle timeout still ends a handed-off stream; and a proxy killed with SIGKILL cuts none of its
handed-off streams, whose instances no other client gets while they last and which come back after they end. After a
handed-off stream the proxy keeps its instance for its next client, as after a relayed one (no claim write).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from harness import wait_free
from nats.aio.client import Client as NATS
from support import nats_client, proxy_metrics, zip_base64
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus

from aube.instance.config import SECRET_HEADER
from aube.instance.handoff_wire import encode_offer
from aube.shared import addresses, names
from aube.shared.bus import request
from aube.shared.registry import Registry
from aube.shared.schemas import UploadReply, UploadRequest

pytestmark = pytest.mark.anyio
process_only = pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)

REPO = Path(__file__).resolve().parents[2]
WHOAMI = REPO / "examples" / "whoami"  # async def fn: the asyncio server
REVERSE = REPO / "examples" / "reverse"  # def fn: the threaded websockets.sync server


async def upload(nc: NATS, name: str, manifest: str, folder: Path = WHOAMI) -> UploadReply:
    body = UploadRequest(name=name, zip=zip_base64(folder, {"aube.toml": manifest}))
    return await request(nc, names.SUBJECT_UPLOAD, body, UploadReply, 300)


def function_folder(folder: Path, code: str) -> Path:
    """A function folder holding `code` as its fn.py (a function written for one test)."""
    folder.mkdir()
    (folder / "fn.py").write_text(code)
    return folder


def ws(port: int, name: str) -> connect:
    return connect(f"ws://127.0.0.1:{port}/{name}", proxy=None, open_timeout=60)


async def whoami(conn: ClientConnection, text: str = "x") -> dict[str, Any]:
    await conn.send(text)
    reply = await conn.recv()
    assert isinstance(reply, str)
    return json.loads(reply)  # type: ignore[no-any-return]


RELAYED_IN = 'aube_relayed_bytes_total{direction="client_to_instance"}'
RELAYED_OUT = 'aube_relayed_bytes_total{direction="instance_to_client"}'


def handed_off(name: str) -> str:
    return f'aube_streams_handed_off_total{{function="{name}"}}'


async def states(registry: Registry, name: str) -> dict[str, tuple[str, bool]]:
    return {e.record.instance_id: (e.record.state, e.record.handed_off) for e in await registry.instances(name)}


async def test_handed_off_stream_round_trips_without_a_relayed_byte(platform) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane()
    port, proxy = await platform.start_proxy(AUBE_HANDOFF="auto")
    relay_port, relay_proxy = await platform.start_proxy(AUBE_HANDOFF="off")
    async with nats_client(platform.nats_url) as (nc, registry):
        await upload(nc, "who", "[scaling]\nmin_free = 1\n")
        async with ws(port, "who") as conn:
            for i in range(50):
                reply = await whoami(conn, f"message {i} " + "x" * 1000)
                assert reply["echo"].startswith(f"message {i} ")
            instance = reply["instance"]
            assert (await states(registry, "who"))[instance] == ("busy", True)  # flagged: the reaper keeps off
            seen = await proxy_metrics(proxy)
            assert seen[handed_off("who")] == 1
            assert seen[RELAYED_IN] == seen[RELAYED_OUT] == 0  # 100 kB moved, none through the proxy
        # The stream's end reaches the proxy: the instance is free again, unflagged, and serves the next client.
        with anyio.fail_after(15):
            while (await states(registry, "who")).get(instance) != ("free", False):
                await anyio.sleep(0.05)
        async with ws(port, "who") as conn:
            assert (await whoami(conn))["streams"] == 1
        # A `def fn` function: the sync server takes the handed-off socket too.
        await upload(nc, "rev", "[scaling]\nmin_free = 1\n", REVERSE)
        async with ws(port, "rev") as conn:
            for text in ("hello", "x" * 70_000):
                await conn.send(text)
                assert await conn.recv() == text[::-1]
        seen = await proxy_metrics(proxy)
        assert seen[handed_off("who")] == 2 and seen[handed_off("rev")] == 1
        assert seen[RELAYED_IN] == seen[RELAYED_OUT] == 0
        # AUBE_HANDOFF=off: the same instances, relayed as before.
        async with ws(relay_port, "who") as conn:
            assert (await whoami(conn, "relayed"))["echo"] == "relayed"
        seen = await proxy_metrics(relay_proxy)
        assert seen.get(handed_off("who"), 0) == 0
        assert seen[RELAYED_IN] > 0 and seen[RELAYED_OUT] > 0


async def test_idle_timeout_ends_a_handed_off_stream(platform) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane()
    port, proxy = await platform.start_proxy(AUBE_HANDOFF="auto")
    async with nats_client(platform.nats_url) as (nc, registry):
        await upload(nc, "idle", "[scaling]\nmin_free = 1\n[limits]\nstream_idle_timeout = 1.5\n")
        async with ws(port, "idle") as conn:
            for _ in range(4):  # traffic keeps it open past the timeout
                await whoami(conn)
                await anyio.sleep(0.8)
            instance = (await whoami(conn))["instance"]
            started = time.monotonic()
            with anyio.fail_after(10), pytest.raises(ConnectionClosed):
                await conn.recv()
            assert 1.4 <= time.monotonic() - started <= 5
        assert (await proxy_metrics(proxy))[handed_off("idle")] == 1
        with anyio.fail_after(15):
            while (await states(registry, "idle")).get(instance) != ("free", False):
                await anyio.sleep(0.05)


def _connect_as(uid: int, path: str) -> str:
    """Connect to `path` from a host process running as `uid`: what another local user gets."""
    code = f"import socket\ns = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect({path!r}); print('connected')\n"
    code += "except OSError as e:\n    print(e.errno)"
    out = subprocess.run(
        ["python3", "-c", code], capture_output=True, text=True, check=True, user=uid, group=uid, extra_groups=[]
    )
    return out.stdout.strip()


@process_only
async def test_handoff_socket_refuses_a_local_process_without_the_credential(platform) -> None:  # type: ignore[no-untyped-def]
    """An attacker on the host: another user cannot even reach the handoff socket (its folder is root's); a root
    process that reaches it has its socket refused unless it presents this instance's own credential (a wrong
    secret, none, another instance's), and a right secret with no socket hands nothing over."""
    await platform.start_controlplane()
    port, _ = await platform.start_proxy(AUBE_HANDOFF="auto")
    async with nats_client(platform.nats_url) as (nc, registry):
        await upload(nc, "who", "[scaling]\nmin_free = 2\n")
        entry, other = await wait_free(registry, "who", 2)
        path = addresses.handoff_path(entry.record.address)
        assert path is not None and Path(path).is_socket()
        assert await anyio.to_thread.run_sync(_connect_as, 65534, path) == str(errno.EACCES)
        head = b"GET /who HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        head += b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        head += f"{SECRET_HEADER}: {entry.record.secret}\r\n\r\n".encode()

        def attempt(secret: str, with_fd: bool = True) -> tuple[bytes, bytes]:
            """Hand over one end of a socket pair; what the control connection and the handed socket then read."""
            mine, theirs = socket.socketpair()
            control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with mine, theirs, control:
                control.settimeout(5)
                mine.settimeout(5)
                control.connect(path)
                offer = encode_offer(secret, head, None, None, 5.0)
                socket.send_fds(control, [offer], [theirs.fileno()] if with_fd else [])
                theirs.close()
                answer = control.recv(1024)
                got = mine.recv(1024)  # b"" once the instance closed its copy: no 101, no 403 even
                if answer.startswith(b'{"taken": true,'):
                    mine.close()  # the stream ends; acknowledged, the instance serves on
                    while b"ended" not in answer:
                        answer += control.recv(1024)
                    control.sendall(b'{"ack": true}\n')
                return answer, got

        for wrong in ("not-the-secret", "", other.record.secret):
            assert await anyio.to_thread.run_sync(attempt, wrong) == (b"", b"")
        # The right secret but no socket passed: nothing to take.
        assert (await anyio.to_thread.run_sync(lambda: attempt(entry.record.secret, False)))[0] == b""
        # The instance's own output (its folder of the process runtime's output, read by `aube logs`).
        output = Path(platform.data_dir, "logs", platform.owner, entry.record.instance_id)
        said = "".join((output / name).read_text() for name in ("stdout", "stderr"))
        assert said.count("refused a handoff without the instance credential") == 4
        # The control: the same offer with the right secret is taken, and the instance answers the handshake.
        answer, got = await anyio.to_thread.run_sync(attempt, entry.record.secret)
        assert answer.startswith(b'{"taken": true,') and got.startswith(b"HTTP/1.1 101")
        # The instances serve on, through the proxy.
        async with ws(port, "who") as a, ws(port, "who") as b:
            assert (await whoami(a, "after"))["echo"] == (await whoami(b, "after"))["echo"] == "after"


async def test_kill_9_of_the_proxy_cuts_no_handed_off_stream(platform) -> None:  # type: ignore[no-untyped-def]
    lease = 2.0
    await platform.start_controlplane()
    platform.start("aube.reaper", AUBE_REAP_INTERVAL="0.2", AUBE_LEASE_TTL=str(lease))
    doomed_port, doomed = await platform.start_proxy(AUBE_LEASE_TTL=str(lease), AUBE_HANDOFF="auto")
    other_port, _ = await platform.start_proxy(AUBE_LEASE_TTL=str(lease), AUBE_CLAIM_TIMEOUT="1")
    async with nats_client(platform.nats_url) as (nc, registry):
        await upload(nc, "who", "[scaling]\nmin_free = 3\nmax_instances = 3\n")
        await wait_free(registry, "who", 3)
        async with ws(doomed_port, "who") as a, ws(doomed_port, "who") as b, ws(doomed_port, "who") as c:
            streams = [a, b, c]
            ids = {(await whoami(s))["instance"] for s in streams}
            assert len(ids) == 3
            with anyio.fail_after(5):
                while sorted((await states(registry, "who")).values()) != [("busy", True)] * 3:
                    await anyio.sleep(0.05)
            doomed.kill9()
            # Past the lease, its grace and several reaper passes: every stream goes on, on its own instance.
            deadline = time.monotonic() + 3 * lease + 3
            while time.monotonic() < deadline:
                for i, s in enumerate(streams):
                    reply = await whoami(s, f"after {i}")
                    assert reply["echo"] == f"after {i}" and reply["streams"] == 1
                await anyio.sleep(0.3)
            assert {iid for iid, st in (await states(registry, "who")).items() if st == ("busy", True)} == ids
            # No other client gets one of these instances while their streams last (max_instances = 3).
            with pytest.raises(InvalidStatus) as refused:
                async with ws(other_port, "who"):
                    pass
            assert refused.value.response.status_code == 503
        # The streams ended without their proxy: each instance exits, its entry goes, and the function serves again.
        try:
            with anyio.fail_after(60):
                while ids & set(await states(registry, "who")):
                    await anyio.sleep(0.2)
        except TimeoutError:
            for log in Path(platform.data_dir, "logs", platform.owner).glob("*/std*"):
                print(f"----- {log.parent.name}/{log.name} -----\n{log.read_text()[-4000:]}")
            raise
        await wait_free(registry, "who", 1)  # the control plane's top-up replaced them
        async with ws(other_port, "who") as conn:
            assert (await whoami(conn, "again"))["echo"] == "again"


@process_only
async def test_sync_function_sends_a_large_message_on_a_handed_off_socket(platform) -> None:  # type: ignore[no-untyped-def]
    """The client's socket comes from the proxy's event loop, non-blocking; the `def fn` server writes with plain
    `sendall`, which on such a socket stops with BlockingIOError (a partial write) once the socket's buffer is full.
    A client that reads slowly (a small receive buffer) fills it with any reply larger than the buffers on the way."""
    await platform.start_controlplane()
    port, proxy = await platform.start_proxy(AUBE_HANDOFF="auto")
    async with nats_client(platform.nats_url) as (nc, _):
        manifest = '[scaling]\nmin_free = 1\n[limits]\nmemory = "512m"\nmax_message = "16m"\n'
        await upload(nc, "big", manifest, REVERSE)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window stays small
        sock.connect(("127.0.0.1", port))
        data = os.urandom(12 << 20)  # no compression: the reply is as large on the wire
        url = f"ws://127.0.0.1:{port}/big"
        async with connect(url, sock=sock, max_size=None, compression=None, open_timeout=60) as conn:
            for _ in range(2):
                await conn.send(data)
                with anyio.fail_after(120):
                    assert await conn.recv() == data[::-1]
        assert (await proxy_metrics(proxy))[handed_off("big")] == 1


@process_only
async def test_the_next_client_is_handed_the_kept_instance_with_no_claim_write(platform, nats_server) -> None:  # type: ignore[no-untyped-def]
    """After a handed-off stream the proxy keeps its instance as after a relayed one (proxy/reserve.py), with no
    write at all: the claim stays flagged while the instance holds the kept control connection (it would exit,
    were the proxy to die). The proxy's next client of the function is handed the same instance with no write either
    (the flag is there, and there is no deadline to record), so it is served while nats-server is stopped (SIGSTOP:
    no write could land). The release, once the reserve's time is over, clears the flag."""
    await platform.start_controlplane()
    port, proxy = await platform.start_proxy(AUBE_HANDOFF="auto", AUBE_RESERVE_SECONDS="6")
    async with nats_client(platform.nats_url) as (nc, registry):
        await upload(nc, "who", "[scaling]\nmin_free = 1\nmax_instances = 1\n")
        async with ws(port, "who") as conn:
            first = (await whoami(conn))["instance"]
            with anyio.fail_after(5):
                while (await states(registry, "who")).get(first) != ("busy", True):
                    await anyio.sleep(0.05)
        # Kept: still this replica's claim, still flagged (no write since the stream's end).
        await anyio.sleep(1.0)
        assert (await states(registry, "who")).get(first) == ("busy", True)
        os.kill(nats_server.process.pid, signal.SIGSTOP)
        try:
            with anyio.fail_after(5):
                async with connect(f"ws://127.0.0.1:{port}/who", proxy=None, open_timeout=5) as conn:
                    reply = await whoami(conn, "kept")
        finally:
            os.kill(nats_server.process.pid, signal.SIGCONT)
        assert (reply["instance"], reply["streams"], reply["echo"]) == (first, 1, "kept")
        seen = await proxy_metrics(proxy)
        assert seen[handed_off("who")] == 2  # handed off both times, never relayed
        assert seen[RELAYED_IN] == seen[RELAYED_OUT] == 0
        assert seen['aube_claims_total{function="who",result="reserved"}'] == 1
        # Not taken again: released once the reserve's 6 s are over, unflagged.
        with anyio.fail_after(20):
            while (await states(registry, "who")).get(first) != ("free", False):
                await anyio.sleep(0.1)


LINGERING = """
import asyncio, json, os

streams = 0


async def fn(websocket):
    global streams
    streams += 1
    try:
        async for message in websocket:
            reply = {"instance": os.environ.get("AUBE_INSTANCE_ID", ""), "streams": streams, "echo": message}
            await websocket.send(json.dumps(reply))
        await asyncio.sleep(2.0)  # still running after its client left
    finally:
        streams -= 1
"""


@process_only
async def test_a_handler_still_running_after_its_stream_is_waited_for_before_the_next_client(  # type: ignore[no-untyped-def]
    platform, tmp_path
) -> None:
    """The instance reports a handed-off stream's end with whether its handler returned. When it has not, the proxy
    asks the instance's health until it has, and only then keeps or frees the instance: the next client is handed it
    once it is free, never offered it while busy (no refusal as busy), and it never carries two streams."""
    folder = function_folder(tmp_path / "lingering", LINGERING)
    await platform.start_controlplane()
    port, proxy = await platform.start_proxy(AUBE_HANDOFF="auto")
    async with nats_client(platform.nats_url) as (nc, _):
        reply = await upload(nc, "linger", "[scaling]\nmin_free = 1\nmax_instances = 1\n", folder)
        assert reply.ok, reply
        async with ws(port, "linger") as conn:
            first = await whoami(conn, "one")
        ended = time.monotonic()
        async with ws(port, "linger") as conn:
            second = await whoami(conn, "two")
        waited = time.monotonic() - ended
    print(f"the next client was served {waited:.2f}s after the first stream ended (its handler ran on for 2 s)")
    assert (second["instance"], second["streams"]) == (first["instance"], 1)
    assert waited >= 1.5
    seen = await proxy_metrics(proxy)
    assert seen[handed_off("linger")] == 2
    assert seen.get('aube_claims_total{function="linger",result="instance_busy"}', 0) == 0


@process_only
async def test_kill_9_of_the_proxy_frees_the_instances_it_kept_flagged(platform) -> None:  # type: ignore[no-untyped-def]
    """A kept claim stays flagged, so the reaper leaves it alone even once its proxy's lease is dead; what frees the
    instance is the instance itself: the proxy's death ends the kept control connection, the instance exits, and
    the control plane drops its entry and tops the function up. Without that, the entry would stay busy for ever."""
    lease = 2.0
    await platform.start_controlplane()
    platform.start("aube.reaper", AUBE_REAP_INTERVAL="0.2", AUBE_LEASE_TTL=str(lease))
    doomed_port, doomed = await platform.start_proxy(
        AUBE_LEASE_TTL=str(lease), AUBE_HANDOFF="auto", AUBE_RESERVE_SECONDS="600"
    )
    other_port, _ = await platform.start_proxy(AUBE_LEASE_TTL=str(lease))
    async with nats_client(platform.nats_url) as (nc, registry):
        await upload(nc, "who", "[scaling]\nmin_free = 2\nmax_instances = 2\n")
        await wait_free(registry, "who", 2)
        async with ws(doomed_port, "who") as a, ws(doomed_port, "who") as b:
            ids = {(await whoami(a))["instance"], (await whoami(b))["instance"]}
        # Both kept (for 600 s), flagged: no other replica can claim them.
        await anyio.sleep(1.0)
        assert {iid: st for iid, st in (await states(registry, "who")).items() if iid in ids} == {
            iid: ("busy", True) for iid in ids
        }
        began = time.monotonic()
        doomed.kill9()
        with anyio.fail_after(60):
            while ids & set(await states(registry, "who")):
                await anyio.sleep(0.2)
        print(f"kept instances gone {time.monotonic() - began:.1f}s after their proxy's SIGKILL")
        await wait_free(registry, "who", 1)
        async with ws(other_port, "who") as conn:
            reply = await whoami(conn, "again")
        assert reply["echo"] == "again" and reply["instance"] not in ids


# Takes the client's socket, then closes the control connection without a word (its own instance's code: the
# function shares the process), so the proxy never hears whether the stream was taken.
SILENT_TAKER = (
    (WHOAMI / "fn.py").read_text()
    + """

import aube.instance.handoff as handoff


def _take_and_say_nothing(self, conn, offer, fds):
    conn.close()
    return None


handoff.HandoffListener._take = _take_and_say_nothing
"""
)


@process_only
async def test_a_client_let_go_after_an_unanswered_offer_is_not_offered_again(  # type: ignore[no-untyped-def]
    platform, tmp_path
) -> None:
    """An offer that got no answer may have been taken, so the proxy lets the client go ("lost"). It must then stop:
    before, it went on to the next instance with the let-go client, relayed to it, and failed writing its answer to
    a closed transport (an error logged, and that instance claimed for nothing)."""
    folder = function_folder(tmp_path / "silent", SILENT_TAKER)
    await platform.start_controlplane()
    port, proxy = await platform.start_proxy(AUBE_HANDOFF="auto")
    async with nats_client(platform.nats_url) as (nc, registry):
        reply = await upload(nc, "silent", "[scaling]\nmin_free = 2\nmax_instances = 2\n", folder)
        assert reply.ok, reply
        await wait_free(registry, "silent", 2)
        with pytest.raises((ConnectionClosed, OSError, TimeoutError, InvalidStatus, InvalidMessage)):
            async with connect(f"ws://127.0.0.1:{port}/silent", proxy=None, open_timeout=10) as conn:
                await whoami(conn)
        await anyio.sleep(1.0)
    seen = await proxy_metrics(proxy)
    print({k: v for k, v in seen.items() if "claims_total" in k})
    assert seen.get('aube_claims_total{function="silent",result="client_gone"}', 0) == 1
    assert "connection from" not in proxy.log_text()  # the gateway's "connection from ... failed"
