"""The instance's side of socket handoff with a real `python -m aube.instance` and a real TCP client: this test
plays the proxy (reads the client's head, passes the socket over the handoff socket with SCM_RIGHTS).

Both servers (a `def fn` on the threaded server, an `async def fn` on asyncio) take the socket and answer the
handshake themselves; an instance whose proxy acknowledges the end serves on, one whose proxy does not exits.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from aube.instance.config import SECRET_HEADER, SECRET_SHA256_ENV
from aube.instance.handoff_wire import encode_offer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SECRET = "handoff-test-secret"


@pytest.fixture(params=["reverse", "reverse-async"])
def instance(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    with running_instance(EXAMPLES / request.param, tmp_path) as started:
        yield started


@contextlib.contextmanager
def running_instance(fn_dir: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    env = {
        **os.environ,
        "AUBE_FN_DIR": str(fn_dir),
        "AUBE_INSTANCE_SOCKET": str(tmp_path / "instance.sock"),
        "AUBE_INSTANCE_HANDOFF": str(tmp_path / "handoff.sock"),
        SECRET_SHA256_ENV: hashlib.sha256(SECRET.encode()).hexdigest(),
        "AUBE_INSTANCE_ID": "i-handoff",
    }
    log = (tmp_path / "instance.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "aube.instance"], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not (tmp_path / "handoff.sock").exists():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "instance.log").read_text()
        time.sleep(0.02)
    try:
        yield proc, tmp_path / "handoff.sock"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
        print((tmp_path / "instance.log").read_text()[-4000:])  # shown for a failed test


def hand_off_one_stream(
    handoff: Path,
    *,
    acknowledge: bool,
    longest: float | None = None,
    ended: str = "closed",
    free: bool = True,
    pieces: bool = False,
    kept: list[socket.socket] | None = None,
) -> str:
    """A client's stream handed to the instance (`longest`: its max duration; the client then talks until it is
    ended); what the client got back first. `free`: whether the instance is to say its handler returned with the
    end; `pieces`: the offer comes in two writes, the descriptor with the first few bytes, the rest a little later;
    `kept`: acknowledge the end as a kept claim and leave the control connection open (appended to the list)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    replies: list[str] = []

    def client() -> None:
        with connect(f"ws://127.0.0.1:{port}/reverse?x=1", open_timeout=10) as ws:
            ws.send("hello")
            replies.append(str(ws.recv(timeout=10)))
            with contextlib.suppress(ConnectionClosed):
                while longest is not None:  # never idle: only the duration can end it
                    ws.send("more")
                    ws.recv(timeout=10)
                    time.sleep(0.05)

    talker = threading.Thread(target=client)
    talker.start()
    control = socket.socket(socket.AF_UNIX)
    with listener, contextlib.ExitStack() as leave_open:
        if kept is None:
            leave_open.enter_context(control)
        conn, _ = listener.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            forwarded = head[:-2] + f"{SECRET_HEADER}: {SECRET}\r\n\r\n".encode()  # as the proxy forwards it
            control.settimeout(10)
            control.connect(str(handoff))
            offer = encode_offer(SECRET, forwarded, None, longest, 3.0)
            split = 5 if pieces else len(offer)
            socket.send_fds(control, [offer[:split]], [conn.fileno()])
            if pieces:
                time.sleep(0.3)
                control.sendall(offer[split:])
        # The proxy's copy is closed: the client's connection lives in the instance only.
        lines = control.makefile("rb")
        assert json.loads(lines.readline()) == {"taken": True, "beats": True, "keeps": True}
        talker.join(15)
        assert json.loads(lines.readline()) == {"ended": ended, "free": free}
        if acknowledge:
            control.sendall(b'{"ack": true, "kept": true}\n' if kept is not None else b'{"ack": true}\n')
        if kept is not None:
            kept.append(control)
    assert replies, "the client got no reply"
    return replies[0]


def test_an_acknowledged_handoff_is_served_and_the_instance_serves_on(
    instance: tuple[subprocess.Popen[bytes], Path],
) -> None:
    proc, handoff = instance
    for _ in range(3):
        assert hand_off_one_stream(handoff, acknowledge=True) == "olleh"
    time.sleep(1.0)
    assert proc.poll() is None


def test_an_unacknowledged_handoff_ends_the_instance(instance: tuple[subprocess.Popen[bytes], Path]) -> None:
    """The proxy that handed the stream over is gone at its end: no one can release the claim, so the instance
    exits (and the control plane then drops its entry)."""
    proc, handoff = instance
    assert hand_off_one_stream(handoff, acknowledge=False) == "olleh"
    assert proc.wait(timeout=15) == 0


def test_the_instance_ends_a_handed_off_stream_at_its_max_duration(
    instance: tuple[subprocess.Popen[bytes], Path],
) -> None:
    proc, handoff = instance
    began = time.monotonic()
    assert hand_off_one_stream(handoff, acknowledge=True, longest=1.0, ended="max_duration") == "olleh"
    assert 1.0 <= time.monotonic() - began < 5
    assert proc.poll() is None


def test_an_offer_that_comes_in_pieces_is_taken(instance: tuple[subprocess.Popen[bytes], Path]) -> None:
    """The asyncio server reads offers on its event loop, and one not whole at the first read is finished by a
    thread (the threaded server reads it there in any case): both serve it."""
    proc, handoff = instance
    assert hand_off_one_stream(handoff, acknowledge=True, pieces=True) == "olleh"
    assert hand_off_one_stream(handoff, acknowledge=True) == "olleh"
    assert proc.poll() is None


def test_a_silent_control_connection_holds_up_no_offer_and_is_closed(
    instance: tuple[subprocess.Popen[bytes], Path],
) -> None:
    """A peer that connects to the handoff socket and says nothing (the function itself may) does not stop the
    proxy's offers, and is closed after the offer timeout."""
    proc, handoff = instance
    with socket.socket(socket.AF_UNIX) as silent:
        silent.connect(str(handoff))
        assert hand_off_one_stream(handoff, acknowledge=True) == "olleh"
        silent.settimeout(15)
        began = time.monotonic()
        assert silent.recv(1) == b""  # closed by the instance
        print(f"silent control connection closed after {time.monotonic() - began:.1f}s more")
    assert hand_off_one_stream(handoff, acknowledge=True) == "olleh"
    assert proc.poll() is None


LINGERING = """
import asyncio

async def fn(websocket):
    async for message in websocket:
        await websocket.send(message[::-1])
    await asyncio.sleep(2.0)  # still running after its client left
"""


def test_the_end_report_says_so_when_the_handler_still_runs(tmp_path: Path) -> None:
    """The report of a stream's end says whether its handler returned (`free`), for the proxy to skip asking the
    instance's health; a handler still running after its client left is reported not free, and the proxy asks."""
    fn_dir = tmp_path / "fn"
    fn_dir.mkdir()
    (fn_dir / "fn.py").write_text(LINGERING)
    with running_instance(fn_dir, tmp_path) as (proc, handoff):
        assert hand_off_one_stream(handoff, acknowledge=True, free=False) == "olleh"
        assert proc.poll() is None


def test_a_kept_claim_is_held_until_released_or_the_next_stream(instance: tuple[subprocess.Popen[bytes], Path]) -> None:
    """Acknowledged as kept, the instance holds the control connection: the proxy's {"released"} lets it go, and so
    does the next stream (the instance closes the old connection itself); it serves on either way."""
    proc, handoff = instance
    kept: list[socket.socket] = []
    assert hand_off_one_stream(handoff, acknowledge=True, kept=kept) == "olleh"
    first = kept.pop()
    with first:
        assert hand_off_one_stream(handoff, acknowledge=True, kept=kept) == "olleh"
        first.settimeout(10)
        assert first.recv(1) == b""  # the next stream was taken: the instance let the old one go
    with kept.pop() as second:
        second.sendall(b'{"released": true}\n')
        second.settimeout(10)
        assert second.recv(1) == b""
    time.sleep(0.5)
    assert proc.poll() is None
    assert hand_off_one_stream(handoff, acknowledge=True) == "olleh"
    assert proc.poll() is None


def test_a_kept_instance_whose_proxy_goes_away_exits(instance: tuple[subprocess.Popen[bytes], Path]) -> None:
    """The kept claim is still flagged in the registry, so the reaper leaves it alone: only the instance can end
    it, and it does once the proxy that keeps it is gone (its control connection ends without {"released"})."""
    proc, handoff = instance
    kept: list[socket.socket] = []
    assert hand_off_one_stream(handoff, acknowledge=True, kept=kept) == "olleh"
    time.sleep(0.5)
    assert proc.poll() is None  # held, while the proxy is there
    kept.pop().close()  # the proxy dies
    assert proc.wait(timeout=15) == 0
