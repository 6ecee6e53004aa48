"""The control plane's and the reaper's `/_aube/metrics`, scraped over HTTP from the real services (processes on a
real nats-server, the process runtime): a deploy moves the build and start counters, a scale-to-zero reap moves the
reaper's and the control plane's stop counters, and the endpoint is on the operator address only: bound to
loopback, serving metrics and health and nothing else, out of reach of the instances.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest
from support import instance_ws, nats_client, wait_http, zip_base64

from aube.controlplane.metrics import ControlPlaneMetrics
from aube.controlplane.runtimes import sandbox
from aube.reaper.metrics import ReaperMetrics
from aube.shared import names, operator_http
from aube.shared.bus import request
from aube.shared.errors import AubeError, InvalidRequest
from aube.shared.metrics import exported_names
from aube.shared.schemas import ScaleReply, ScaleRequest, UploadReply, UploadRequest

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
REVERSE = REPO / "examples" / "reverse"
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)$")

# Passes the bundle's checks (a top-level fn), ends as soon as an instance imports it.
BROKEN = "raise SystemExit(3)\n\n\ndef fn(websocket):\n    pass\n"

# A function that dials host:port for each message and says what happened.
DIALER = """
import json
import socket


def fn(websocket):
    for message in websocket:
        host, port = json.loads(message)
        s = socket.socket()
        s.settimeout(3)
        try:
            s.connect((host, int(port)))
            websocket.send("connected")
        except OSError as e:
            websocket.send(f"error {e.errno}")
        finally:
            s.close()
"""


async def raw_get(port: int, path: str, host: str = "127.0.0.1", method: str = "GET") -> bytes:
    async with await anyio.connect_tcp(host, port) as s:
        await s.send(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        with anyio.fail_after(10):
            try:
                while True:
                    data += await s.receive()
            except anyio.EndOfStream:
                pass
    return data


async def scrape_text(port: int) -> str:
    reply = await raw_get(port, names.PATH_METRICS)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), reply[:200]
    assert b"text/plain; version=0.0.4" in head
    return body.decode()


async def scrape(port: int) -> dict[str, float]:
    """Every sample of the endpoint's answer, by its name and labels as written."""
    samples = {}
    for line in (await scrape_text(port)).splitlines():
        if line and not line.startswith("#"):
            match = SAMPLE.match(line)
            assert match, f"not a sample: {line!r}"
            samples[match[1]] = float(match[2])
    return samples


async def until(port: int, key: str, at_least: float, timeout: float = 60) -> dict[str, float]:
    with anyio.fail_after(timeout):
        while (samples := await scrape(port)).get(key, 0) < at_least:
            await anyio.sleep(0.2)
    return samples


def operator_ports(cp: Any, reaper: Any) -> tuple[int, int]:
    return int(cp.env["AUBE_CONTROLPLANE_OPERATOR_PORT"]), int(reaper.env["AUBE_REAPER_OPERATOR_PORT"])


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_a_deploy_and_a_reap_move_the_counters(platform: Any) -> None:
    cp = await platform.start_controlplane()
    reaper = platform.start("aube.reaper", AUBE_REAP_INTERVAL="0.3")
    cp_port, reaper_port = operator_ports(cp, reaper)
    await wait_http(cp_port)
    await wait_http(reaper_port)
    # What a real scrape exports is what the definitions say (tests/unit/test_dashboard.py checks the dashboard
    # against the definitions).
    assert exported_names(await scrape_text(cp_port)) == ControlPlaneMetrics().set.sample_names()
    assert exported_names(await scrape_text(reaper_port)) == ReaperMetrics().set.sample_names()
    before = await scrape(cp_port)
    assert before['aube_builds_total{result="ok"}'] == 0
    assert before["aube_functions"] == 0
    assert (await scrape(reaper_port))['aube_reaps_total{reason="idle"}'] == 0

    async with nats_client(platform.nats_url) as (nc, registry):
        # Scale to zero: the upload's health-probe instance is stopped at once.
        manifest = "[scaling]\nmin_free = 0\nidle_timeout = 1\n"
        body = UploadRequest(name="rev", zip=zip_base64(REVERSE, {"aube.toml": manifest}))
        await request(nc, names.SUBJECT_UPLOAD, body, UploadReply, 300)
        deployed = await scrape(cp_port)
        assert deployed['aube_builds_total{result="ok"}'] == 1
        assert deployed['aube_build_duration_seconds_count{result="ok"}'] == 1
        assert deployed['aube_instance_starts_total{runtime="process",result="ok"}'] == 1
        assert deployed['aube_instance_start_duration_seconds_count{runtime="process"}'] == 1
        assert deployed['aube_instance_stops_total{reason="health_probe_done"}'] == 1
        await until(cp_port, "aube_functions", 1)  # upkeep's next look at the registry

        # A start that fails its health check: the version is built, its instance never healthy.
        broken = UploadRequest(name="broken", zip=zip_base64(REVERSE, {"fn.py": BROKEN}))
        with pytest.raises(AubeError):
            await request(nc, names.SUBJECT_UPLOAD, broken, UploadReply, 300)
        failed = await scrape(cp_port)
        assert failed['aube_builds_total{result="ok"}'] == 2
        assert failed['aube_instance_starts_total{runtime="process",result="failed"}'] >= 1

        # A scale-out (what a proxy asks for a waiting client), then the idle instance is reaped and stopped.
        await request(nc, names.SUBJECT_SCALE, ScaleRequest(name="rev"), ScaleReply, 120)
        assert (await scrape(cp_port))['aube_instance_starts_total{runtime="process",result="ok"}'] == 2
        reaped = await until(reaper_port, 'aube_reaps_total{reason="idle"}', 1)
        assert reaped['aube_reap_passes_total{result="ok"}'] >= 1
        stopped = await until(cp_port, 'aube_instance_stops_total{reason="idle"}', 1)
        assert stopped['aube_instance_stops_total{reason="idle"}'] == 1
        assert not await registry.instances("rev")


def _bwrap_works() -> bool:
    bwrap = shutil.which("bwrap")
    return bwrap is not None and subprocess.run(sandbox.probe_argv(bwrap), capture_output=True).returncode == 0


def _host_address() -> str | None:
    """An IPv4 address of this machine that is not loopback (routing lookup only: a UDP connect sends nothing)."""
    candidates = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            candidates.add(s.getsockname()[0])
        except OSError:
            pass
    public = sorted(a for a in candidates if not a.startswith("127."))
    return public[0] if public else None


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_metrics_are_on_the_operator_address_only(platform: Any, tmp_path: Path) -> None:
    sandboxed = _bwrap_works()
    cp = await platform.start_controlplane(AUBE_SANDBOX="bwrap" if sandboxed else "none")
    reaper = platform.start("aube.reaper")
    cp_port, reaper_port = operator_ports(cp, reaper)
    await wait_http(cp_port)
    await wait_http(reaper_port)
    for port in (cp_port, reaper_port):
        # Metrics and health, nothing else: no function path, no other method.
        assert (await raw_get(port, names.PATH_HEALTH)).startswith(b"HTTP/1.1 200 ")
        assert (await raw_get(port, "/rev")).startswith(b"HTTP/1.1 404 ")
        assert (await raw_get(port, names.PATH_METRICS, method="POST")).startswith(b"HTTP/1.1 405 ")
        # Bound to loopback: the machine's other address finds nothing listening there.
        address = _host_address()
        if address is not None:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((address, port), timeout=5).close()

    # Off: no endpoint, and the service runs all the same.
    quiet = platform.start("aube.reaper", AUBE_REAPER_OPERATOR_PORT="off")
    with anyio.fail_after(60):
        while "running (every" not in quiet.log_text():
            assert quiet.running(), quiet.log_text()
            await anyio.sleep(0.1)
    assert "/_aube/metrics" not in quiet.log_text()

    if not sandboxed:
        pytest.skip("bubblewrap cannot create namespaces here: an unsandboxed instance shares the host's loopback")
    # A sandboxed instance dials both operator ports on the loopback it sees: neither is there.
    folder = tmp_path / "dialer"
    folder.mkdir()
    (folder / "fn.py").write_text(textwrap.dedent(DIALER))
    async with nats_client(platform.nats_url) as (nc, registry):
        body = UploadRequest(name="dialer", zip=zip_base64(folder, {"aube.toml": "[scaling]\nmin_free = 1\n"}))
        await request(nc, names.SUBJECT_UPLOAD, body, UploadReply, 300)
        entry = next(e for e in await registry.instances("dialer") if e.record.state == "free")
        async with instance_ws(entry.record.address, secret=entry.record.secret) as ws:
            for port in (cp_port, reaper_port):
                await ws.send(json.dumps(["127.0.0.1", port]))
                with anyio.fail_after(20):
                    assert str(await ws.recv()).startswith("error")


async def test_the_listener_bounds_heads_and_names_a_taken_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared operator listener on real loopback sockets: port 0 is a free port it reports, a head too large
    or too slow gets its answer without holding the listener, and a port in use is a clear refusal to start."""
    monkeypatch.setattr(operator_http, "HEAD_TIMEOUT", 0.5)
    async with anyio.create_task_group() as tg:
        port = await tg.start(operator_http.serve, "127.0.0.1", 0, lambda: "x_total 1\n", "AUBE_X_PORT")
        assert port != 0
        assert (await raw_get(port, names.PATH_METRICS)).endswith(b"x_total 1\n")
        async with await anyio.connect_tcp("127.0.0.1", port) as s:
            await s.send(b"GET /" + b"a" * (2 * operator_http.MAX_HEAD_BYTES))
            assert (await s.receive()).startswith(b"HTTP/1.1 400 ")
        async with await anyio.connect_tcp("127.0.0.1", port) as slow:
            await slow.send(b"GET /_aube/metrics HTTP/1.1\r\n")  # and no more
            with anyio.fail_after(5):
                assert (await slow.receive()).startswith(b"HTTP/1.1 408 ")
        # Meanwhile and after, the listener answers.
        assert (await raw_get(port, names.PATH_HEALTH)).startswith(b"HTTP/1.1 200 ")
        with pytest.raises(InvalidRequest, match=r"127\.0\.0\.1:\d+: Address already in use.*AUBE_X_PORT=off"):
            await operator_http.serve("127.0.0.1", port, lambda: "", "AUBE_X_PORT")
        tg.cancel_scope.cancel()
