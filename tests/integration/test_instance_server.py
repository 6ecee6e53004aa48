"""`python -m aube.instance` as a real process on a free port, driven by real websockets clients."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from aube.instance.config import SECRET_HEADER, SECRET_SHA256_ENV

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
COMMAND_ENV = {"AUBE_FN_RUNTIME": "command", "AUBE_FN_COMMAND": json.dumps(["python3", "-u", "reverse.py"])}


@dataclass
class Instance:
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    secret: str = ""  # the instance credential the health check presents (when the instance has one)

    def url(self, path: str = "/fn") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def health(self) -> dict[str, object]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/_aube/health", headers={SECRET_HEADER: self.secret} if self.secret else {})
            response = conn.getresponse()
            assert response.status == 200
            assert response.getheader("Content-Type") == "application/json"
            body: dict[str, object] = json.loads(response.read())
            return body
        finally:
            conn.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until(self, check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; instance output:\n{self.output()}")
            time.sleep(0.02)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def start_instance(tmp_path: Path) -> Iterator[Callable[..., Instance]]:
    started: list[Instance] = []

    def start(
        fn_dir: Path,
        env: dict[str, str] | None = None,
        argv: list[str] | None = None,
        *,
        replace_env: bool = False,
        secret: str = "",
    ) -> Instance:
        port = _free_port()
        log = tmp_path / f"instance-{port}.log"
        full_env = {} if replace_env else {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        full_env.update(
            {
                "AUBE_FN_DIR": str(fn_dir),
                "AUBE_INSTANCE_HOST": "127.0.0.1",
                "AUBE_INSTANCE_PORT": str(port),
                "AUBE_INSTANCE_ID": f"inst-{port}",
                "AUBE_FUNCTION": fn_dir.name,
                "AUBE_VERSION": "1",
                "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        full_env.update(env or {})
        if secret:
            full_env[SECRET_SHA256_ENV] = hashlib.sha256(secret.encode()).hexdigest()
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv or [sys.executable, "-m", "aube.instance"],
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
            )
        instance = Instance(process, port, log, secret)
        started.append(instance)

        def healthy() -> bool:
            if process.poll() is not None:
                pytest.fail(f"instance exited with {process.returncode}:\n{instance.output()}")
            try:
                instance.health()
            except OSError:
                return False
            return True

        instance.wait_until(healthy, "the health endpoint")
        return instance

    yield start
    for instance in started:
        if instance.process.poll() is None:
            instance.process.kill()
        instance.process.wait(timeout=10)


def _function(tmp_path: Path, source: str, name: str = "fn") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "fn.py").write_text(textwrap.dedent(source))
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it counts as leaked, so look at its state.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def _close_code(ws: ClientConnection) -> tuple[int | None, str | None]:
    return ws.close_code, ws.close_reason


async def _expect_close(ws: ClientConnection) -> tuple[int | None, str | None]:
    with pytest.raises(ConnectionClosed):
        await ws.recv()
    return _close_code(ws)


# --- the four reverse examples, health, logging ----------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("example", "env"),
    [("reverse", {}), ("reverse-async", {}), ("reverse-gen", {}), ("reverse-command", COMMAND_ENV)],
)
async def test_reverse_examples(start_instance: Callable[..., Instance], example: str, env: dict[str, str]) -> None:
    instance = start_instance(EXAMPLES / example, env)
    for _ in range(2):  # the instance serves stream after stream
        async with connect(instance.url("/reverse?a=b"), proxy=None) as ws:
            await ws.send("hello")
            assert await ws.recv() == "olleh"
            await ws.send("Straße ✓")
            assert await ws.recv() == "✓ eßartS"
        assert ws.close_code == 1000
    instance.wait_until(lambda: instance.output().count("stream ended") == 2, "two stream log lines")
    line = next(line for line in instance.output().splitlines() if "stream ended" in line)
    assert "in=2 out=2 code=1000" in line
    assert f"function={example}" in line
    assert "a=b" not in line  # queries may carry secrets
    assert instance.health()["streams_served"] == 2


@pytest.mark.anyio
@pytest.mark.parametrize("example", ["reverse", "reverse-async"])
async def test_health_while_busy_and_503_for_a_second_stream(
    start_instance: Callable[..., Instance], example: str
) -> None:
    instance = start_instance(EXAMPLES / example)
    assert instance.health() == {
        "status": "ok",
        "busy": False,
        "streams_served": 0,
        "instance": f"inst-{instance.port}",
    }
    async with connect(instance.url(), proxy=None) as ws:
        await ws.send("abc")
        assert await ws.recv() == "cba"
        health = instance.health()
        assert health["busy"] is True
        assert health["streams_served"] == 1
        with pytest.raises(InvalidStatus) as rejected:
            async with connect(instance.url(), proxy=None, open_timeout=5):
                pass
        assert rejected.value.response.status_code == 503
        assert rejected.value.response.headers["Retry-After"] == "1"
        # The first stream is untouched by the rejected one.
        await ws.send("xyz")
        assert await ws.recv() == "zyx"
    instance.wait_until(lambda: instance.health()["busy"] is False, "the slot to be free")
    async with connect(instance.url(), proxy=None) as ws:
        await ws.send("ok")
        assert await ws.recv() == "ko"


@pytest.mark.parametrize("example", ["reverse", "reverse-async"])
@pytest.mark.parametrize("leaves", ["fin", "rst"])
def test_a_request_whose_peer_left_at_once_frees_the_slot_at_once(
    start_instance: Callable[..., Instance], example: str, leaves: str
) -> None:
    # A client that gave up waiting sends its request and leaves: the handshake dies after the slot was claimed.
    # The claim used to last its whole 10 s pending timeout: the instance said busy, and the proxy stopped it.
    instance = start_instance(EXAMPLES / example)
    for _ in range(3):
        key = base64.b64encode(os.urandom(16)).decode()
        head = (
            "GET /fn HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", instance.port)) as peer:
            peer.sendall(head.encode())
            if leaves == "fin":
                peer.shutdown(socket.SHUT_WR)
            else:
                peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        left_at = time.monotonic()
        while instance.health()["busy"] is not False:
            assert time.monotonic() - left_at < 2, "the slot stayed claimed for a connection that is gone"
            time.sleep(0.02)


@pytest.mark.anyio
async def test_whoami_counts_its_own_streams(start_instance: Callable[..., Instance]) -> None:
    instance = start_instance(EXAMPLES / "whoami")
    async with connect(instance.url("/whoami"), proxy=None) as ws:
        await ws.send("hi")
        reply = json.loads(await ws.recv())
    assert reply == {"instance": f"inst-{instance.port}", "streams": 1, "echo": "hi"}


# --- failures ----------------------------------------------------------------------------------------------

RAISING = {
    "sync": """
        def fn(websocket):
            for message in websocket:
                if message == "boom":
                    raise ValueError("boom " + "é" * 200)
                websocket.send(message)
    """,
    "async": """
        async def fn(websocket):
            async for message in websocket:
                if message == "boom":
                    raise ValueError("boom " + "é" * 200)
                await websocket.send(message)
    """,
    "generator": """
        async def fn(messages):
            async for message in messages:
                if message == "boom":
                    raise ValueError("boom " + "é" * 200)
                yield message
    """,
}


@pytest.mark.anyio
@pytest.mark.parametrize("style", sorted(RAISING))
async def test_raising_function_closes_1011_and_instance_keeps_serving(
    start_instance: Callable[..., Instance], tmp_path: Path, style: str
) -> None:
    instance = start_instance(_function(tmp_path, RAISING[style]))
    async with connect(instance.url(), proxy=None) as ws:
        await ws.send("echo")
        assert await ws.recv() == "echo"
        await ws.send("boom")
        code, reason = await _expect_close(ws)
    assert code == 1011
    assert reason is not None
    assert reason.startswith("ValueError: boom éé")
    assert len(reason.encode()) <= 123
    async with connect(instance.url(), proxy=None) as ws:
        await ws.send("again")
        assert await ws.recv() == "again"
    assert "function raised" in instance.output()


def test_unloadable_function_exits_non_zero(tmp_path: Path) -> None:
    folder = _function(tmp_path, "def not_fn(websocket): pass\n")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update({"AUBE_FN_DIR": str(folder), "AUBE_INSTANCE_PORT": str(_free_port())})
    done = subprocess.run(
        [sys.executable, "-m", "aube.instance"], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 1
    assert "defines no `fn`" in done.stdout


# --- subprotocols ------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_subprotocol_client_first_choice_by_default(start_instance: Callable[..., Instance]) -> None:
    instance = start_instance(EXAMPLES / "reverse")
    async with connect(instance.url(), proxy=None, subprotocols=["b.v1", "a.v1"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "b.v1"
    async with connect(instance.url(), proxy=None) as ws:
        assert ws.subprotocol is None


@pytest.mark.anyio
@pytest.mark.parametrize("style", ["sync", "async"])
async def test_subprotocols_declared_by_the_function(
    start_instance: Callable[..., Instance], tmp_path: Path, style: str
) -> None:
    source = {
        "sync": "def fn(websocket):\n    websocket.send(websocket.subprotocol)\n    websocket.recv()\n",
        "async": (
            "async def fn(websocket):\n    await websocket.send(websocket.subprotocol)\n    await websocket.recv()\n"
        ),
    }[style]
    folder = _function(tmp_path, 'subprotocols = ["chat.v2", "chat.v1"]\n' + source)
    instance = start_instance(folder)
    async with connect(instance.url(), proxy=None, subprotocols=["chat.v1", "chat.v2"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "chat.v2"
        assert await ws.recv() == "chat.v2"  # the function sees what was negotiated
    with pytest.raises(InvalidStatus) as rejected:
        async with connect(instance.url(), proxy=None, subprotocols=["other"]):  # type: ignore[list-item]
            pass
    assert rejected.value.response.status_code == 400
    instance.wait_until(lambda: instance.health()["busy"] is False, "the slot to be free")
    async with connect(instance.url(), proxy=None, subprotocols=["chat.v1"]) as ws:  # type: ignore[list-item]
        assert await ws.recv() == "chat.v1"


# --- the command runtime -----------------------------------------------------------------------------------

PID_THEN_ECHO = """
import os, signal, sys
if len(sys.argv) > 1 and sys.argv[1] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(os.getpid(), flush=True)
for line in sys.stdin:
    print(line.rstrip("\\n"), flush=True)
"""


def _command_folder(tmp_path: Path, script: str, name: str = "cmd") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "prog.py").write_text(textwrap.dedent(script))
    return folder


def _command_env(*args: str, mode: str = "lines") -> dict[str, str]:
    return {
        "AUBE_FN_RUNTIME": "command",
        "AUBE_FN_COMMAND": json.dumps(["python3", "-u", "prog.py", *args]),
        "AUBE_FN_MODE": mode,
        "AUBE_COMMAND_GRACE": "0.3",
    }


@pytest.mark.anyio
@pytest.mark.parametrize("stubborn", [False, True], ids=["terminated", "killed"])
async def test_command_process_is_gone_after_the_client_leaves(
    start_instance: Callable[..., Instance], tmp_path: Path, stubborn: bool
) -> None:
    args = ("stubborn",) if stubborn else ()
    instance = start_instance(_command_folder(tmp_path, PID_THEN_ECHO), _command_env(*args))
    async with connect(instance.url(), proxy=None) as ws:
        pid = int(await ws.recv())
        assert _alive(pid)
        await ws.send("ping")
        assert await ws.recv() == "ping"
    instance.wait_until(lambda: not _alive(pid), f"command pid {pid} to be gone")
    instance.wait_until(lambda: instance.health()["busy"] is False, "the slot to be free")


@pytest.mark.anyio
@pytest.mark.parametrize(("status", "code"), [(0, 1000), (3, 1011)])
async def test_command_exit_closes_the_stream(
    start_instance: Callable[..., Instance], tmp_path: Path, status: int, code: int
) -> None:
    script = f"import sys\nprint(input()[::-1], flush=True)\nsys.stdout.write('no newline')\nsys.exit({status})\n"
    instance = start_instance(_command_folder(tmp_path, script), _command_env())
    async with connect(instance.url(), proxy=None) as ws:
        await ws.send("abc")
        assert await ws.recv() == "cba"
        assert await ws.recv() == "no newline"  # output written before exit is not lost
        got_code, reason = await _expect_close(ws)
    assert got_code == code
    assert reason == ("" if status == 0 else "command exited with status 3")


@pytest.mark.anyio
async def test_command_binary_mode(start_instance: Callable[..., Instance], tmp_path: Path) -> None:
    script = """
        import os
        while data := os.read(0, 65536):
            os.write(1, data)
    """
    instance = start_instance(_command_folder(tmp_path, script), _command_env(mode="binary"))
    payload = bytes(range(256)) + b"\n\x00"
    async with connect(instance.url(), proxy=None) as ws:
        await ws.send(payload)
        received = b""
        while len(received) < len(payload):
            chunk = await ws.recv()
            assert isinstance(chunk, bytes)
            received += chunk
    assert received == payload


@pytest.mark.anyio
async def test_command_that_cannot_start_closes_1011(start_instance: Callable[..., Instance], tmp_path: Path) -> None:
    folder = tmp_path / "nothing"
    folder.mkdir()
    env = {"AUBE_FN_RUNTIME": "command", "AUBE_FN_COMMAND": json.dumps(["./missing-program"])}
    instance = start_instance(folder, env)
    for _ in range(2):
        async with connect(instance.url(), proxy=None) as ws:
            code, reason = await _expect_close(ws)
        assert code == 1011
        assert reason is not None
        assert "cannot start command" in reason


# --- shutdown ----------------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("example", "env"),
    [("reverse", {}), ("reverse-async", {}), ("reverse-command", COMMAND_ENV)],
)
async def test_sigterm_closes_the_stream_with_1001_and_exits_0(
    start_instance: Callable[..., Instance], example: str, env: dict[str, str]
) -> None:
    instance = start_instance(EXAMPLES / example, env)
    async with connect(instance.url(), proxy=None) as ws:
        await ws.send("abc")
        assert await ws.recv() == "cba"
        instance.process.send_signal(signal.SIGTERM)
        code, _ = await _expect_close(ws)
    assert code == 1001
    assert instance.process.wait(timeout=10) == 0
    with pytest.raises(ConnectionRefusedError):
        instance.health()


@pytest.mark.anyio
async def test_sigterm_kills_a_running_command(start_instance: Callable[..., Instance], tmp_path: Path) -> None:
    instance = start_instance(_command_folder(tmp_path, PID_THEN_ECHO), _command_env("stubborn"))
    async with connect(instance.url(), proxy=None) as ws:
        pid = int(await ws.recv())
        instance.process.send_signal(signal.SIGTERM)
        code, _ = await _expect_close(ws)
    assert code == 1001
    assert instance.process.wait(timeout=10) == 0
    instance.wait_until(lambda: not _alive(pid), f"command pid {pid} to be gone")


STUCK = {
    "sync": "import time\ndef fn(websocket):\n    websocket.recv()\n    time.sleep(120)\n",
    # Blocks the event loop itself: only the signal handler and the watchdog thread still run.
    "async": "import time\nasync def fn(websocket):\n    await websocket.recv()\n    time.sleep(120)\n",
}


@pytest.mark.anyio
@pytest.mark.parametrize("style", sorted(STUCK))
async def test_sigterm_exits_0_even_when_the_function_never_returns(
    start_instance: Callable[..., Instance], tmp_path: Path, style: str
) -> None:
    instance = start_instance(_function(tmp_path, STUCK[style]), {"AUBE_SHUTDOWN_GRACE": "0.5"})
    async with connect(instance.url(), proxy=None) as ws:
        await ws.send("go")
        if style == "sync":
            instance.wait_until(lambda: instance.health()["busy"] is True, "the stream to start")
        else:
            await anyio.sleep(0.3)  # a blocked loop answers no health check: give it time to get stuck
        instance.process.send_signal(signal.SIGTERM)
        assert instance.process.wait(timeout=15) == 0


# --- the container's layout --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_runs_from_the_image_layout_with_only_websockets(
    start_instance: Callable[..., Instance], tmp_path: Path
) -> None:
    """As in the image: services/instance/ copied to lib/aube/instance (no aube/__init__.py), websockets beside
    it, no site-packages (python -S), and nothing written next to the code or the function."""
    lib = tmp_path / "lib"
    shutil.copytree(
        REPO / "services" / "instance", lib / "aube" / "instance", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(Path(websockets.__file__).parent, lib / "websockets", ignore=shutil.ignore_patterns("__pycache__"))
    fn_dir = tmp_path / "function"
    shutil.copytree(EXAMPLES / "reverse", fn_dir)
    env = {"PYTHONPATH": str(lib), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    instance = start_instance(fn_dir, env, [sys.executable, "-S", "-m", "aube.instance"], replace_env=True)
    async with connect(instance.url(), proxy=None) as ws:
        await ws.send("image")
        assert await ws.recv() == "egami"
    written = [p for p in [*lib.rglob("__pycache__"), *fn_dir.rglob("__pycache__")]]
    assert written == []


HEADERS_FN = """\
    import json


    async def fn(websocket):
        async for message in websocket:
            await websocket.send(json.dumps(list(websocket.request.headers.raw_items())))
"""


async def _raw_status(port: int, head: str) -> int:
    """Send one request head; the status of the answer (the connection is closed, whatever it was)."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(head.encode("latin-1"))
        answer = b""
        with anyio.fail_after(10):
            while b"\r\n" not in answer:
                answer += await stream.receive()
    return int(answer.split(b" ", 2)[1])


def _upgrade(path: str = "/fn", *extra: str) -> str:
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: x",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *extra,
    ]
    return "\r\n".join(lines) + "\r\n\r\n"


@pytest.mark.anyio
@pytest.mark.parametrize("style", ["async", "sync"])
async def test_only_the_instance_credential_opens_a_stream_or_the_health_check(
    start_instance: Callable[..., Instance], tmp_path: Path, style: str
) -> None:
    source = HEADERS_FN
    if style == "sync":
        source = source.replace("async def", "def").replace("async for", "for").replace("await ", "")
    secret = "s3cr3t-" + os.urandom(16).hex()
    instance = start_instance(_function(tmp_path, source), secret=secret)
    digest = hashlib.sha256(secret.encode()).hexdigest()
    health = "GET /_aube/health HTTP/1.1\r\nHost: x\r\n"
    refused = [
        _upgrade(),  # no credential
        health + "\r\n",
        _upgrade("/fn", f"{SECRET_HEADER}: wrong"),
        _upgrade("/fn", f"{SECRET_HEADER}: {digest}"),  # the hash a function can read is not the credential
        _upgrade(f"/fn?{SECRET_HEADER}={secret}&secret={secret}"),  # only the header counts
        _upgrade("/fn", f"{SECRET_HEADER}: {secret}", f"{SECRET_HEADER}: wrong"),  # a second copy, either order
        _upgrade("/fn", f"{SECRET_HEADER}: wrong", f"x-aube-instance-secret: {secret}"),
        _upgrade("/fn", f"X_Aube_Instance_Secret: {secret}"),  # another header, not a spelling of this one
        _upgrade("/fn", f"{SECRET_HEADER}: {secret[:-1]}"),
        health + f"{SECRET_HEADER}: {secret}x\r\n\r\n",
    ]
    for head in refused:
        assert await _raw_status(instance.port, head) == 403, head
    # Nothing above came near the stream slot.
    assert instance.health() == {
        "status": "ok",
        "busy": False,
        "streams_served": 0,
        "instance": f"inst-{instance.port}",
    }
    assert "refused a request without the instance credential" in instance.output()
    assert secret not in instance.output()

    # The right one, in any case of the header's name, opens the stream; the function never sees the header.
    async with connect(instance.url(), proxy=None, additional_headers={"x-AUBE-instance-SECRET": secret}) as ws:
        await ws.send("headers")
        with anyio.fail_after(10):
            seen = json.loads(await ws.recv())
    assert all(name.lower() != SECRET_HEADER.lower() for name, _ in seen)
    assert secret not in json.dumps(seen)
    assert instance.health()["streams_served"] == 1
