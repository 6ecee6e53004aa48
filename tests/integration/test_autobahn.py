"""Autobahn|Testsuite's fuzzing client (issue 11, item 6): a stream through socket handoff, and one through the relay,
get the same case results as a direct connection to the instance.

`wstest -m fuzzingclient` (autobahntestsuite 0.8.2, on Python 2.7 in .venv-autobahn: scripts/setup.sh) runs its
cases against two echo functions, one per server flavour (`def fn`: the threaded websockets.sync server; `async def
fn`: the asyncio one), three ways: straight to an instance (through a local forwarder that adds the instance
credential, as a proxy does, and nothing else), through a proxy with AUBE_HANDOFF=auto, and through one with
AUBE_HANDOFF=off. Each case's verdict (`behavior`) must be the same on all three paths. The results per path are in
docs/handoff.md, "Conformance".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
from harness import wait_free, zip_files
from nats.aio.client import Client as NATS
from support import REPO, nats_client

from aube.instance.config import SECRET_HEADER
from aube.shared import addresses, names
from aube.shared.bus import request
from aube.shared.natsserver import free_port
from aube.shared.schemas import UploadReply, UploadRequest

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)]

WSTEST = REPO / ".venv-autobahn" / "bin" / "wstest"

ECHO = {
    "sync": "def fn(websocket):\n    for message in websocket:\n        websocket.send(message)\n",
    "async": "async def fn(websocket):\n    async for message in websocket:\n        await websocket.send(message)\n",
}
# Case 9 goes up to the function's message limit: the default, 1 MiB, keeps the run short. Left out above it:
# 9.1.4-6 and 9.2.4-6 (4 to 16 MiB), 9.3 and 9.4 (4 MiB in fragments of 64 B to 4 MiB).
MAX_MESSAGE = "1m"
MANIFEST = f'[scaling]\nmin_free = 2\nmax_instances = 4\n[limits]\nmax_message = "{MAX_MESSAGE}"\n'
# Of 12 and 13 (permessage-deflate: 1000 messages each, 16 B to 256 B here, with the client's offers of 13.1 and
# 13.3), the small-message cases: the larger ones take minutes under Python 2.7's compression.
DEFLATE = [f"{block}.{i}" for block in ("12.1", "13.1", "13.3") for i in range(1, 4)]
CASES = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*", *DEFLATE]
ABOVE_THE_LIMIT = ["9.1.4", "9.1.5", "9.1.6", "9.2.4", "9.2.5", "9.2.6", "9.3.*", "9.4.*"]

# Cases whose verdict may be OK on one path and NON-STRICT on another, and why. Each sends a valid text message, then
# a frame with a protocol error, then a ping, octet by octet: the whole valid message arrives before the bad frame
# does, so its echo (from the function: a thread, or a task) races the connection's reader failing the connection.
# OK when the echo leaves first, NON-STRICT when the failure wins; an extra hop or a loaded machine shifts which.
# (The same cases sent in one chunk, 3.2-3.3, 4.1.3-4, 4.2.3-4, fail while the echo is still queued: no race.)
RACE_PRONE = {
    "3.4": "text, then a frame with reserved bits set, then a ping, octet by octet",
    "4.1.5": "text, then a frame with a reserved data opcode (7), then a ping, octet by octet",
    "4.2.5": "text, then a frame with a reserved control opcode (15), then a ping, octet by octet",
}


def spec(outdir: Path, urls: dict[str, str]) -> dict[str, Any]:
    return {
        "outdir": str(outdir),
        "servers": [{"agent": agent, "url": url} for agent, url in urls.items()],
        "cases": CASES,
        "exclude-cases": ABOVE_THE_LIMIT,
        "exclude-agent-cases": {},
    }


async def fuzz(work: Path, label: str, urls: dict[str, str]) -> dict[str, dict[str, str]]:
    """Run the fuzzing client against `urls` (agent -> ws:// URL), one client per agent at once (each function has
    instances of its own); each agent's verdict per case."""
    results: dict[str, dict[str, str]] = {}

    async def one(agent: str, url: str) -> None:
        name = f"{label}-{agent}"
        outdir = work / f"reports-{name}"
        spec_path = work / f"spec-{name}.json"
        spec_path.write_text(json.dumps(spec(outdir, {agent: url})))
        log_path = work / f"wstest-{name}.log"
        with log_path.open("wb") as log, anyio.fail_after(300):
            argv = [str(WSTEST), "-m", "fuzzingclient", "-s", str(spec_path)]
            done = await anyio.run_process(argv, cwd=work, stdout=log, stderr=log, check=False)
        index = outdir / "index.json"
        assert done.returncode == 0 and index.exists(), log_path.read_text()[-3000:]
        report = json.loads(index.read_text())[agent]
        results[agent] = {case: result["behavior"] for case, result in report.items()}

    async with anyio.create_task_group() as tasks:
        for agent, url in urls.items():
            tasks.start_soon(one, agent, url)
    return results


class CredentialForwarder:
    """What a proxy adds to a relayed stream, and nothing else: the instance credential in the request head. Every
    other byte goes through unchanged, and an end of stream (EOF) is passed on as one."""

    def __init__(self, address: str, secret: str) -> None:
        self.target = addresses.parse(address)
        self.secret = secret
        self.port = free_port()

    async def start(self) -> asyncio.Server:
        return await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if isinstance(self.target, addresses.UnixAddress):
                up_reader, up_writer = await asyncio.open_unix_connection(self.target.path)
            else:
                up_reader, up_writer = await asyncio.open_connection(self.target.host, self.target.port)
            up_writer.write(head[:-2] + f"{SECRET_HEADER}: {self.secret}\r\n\r\n".encode())
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
            up_writer.close()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(1 << 16):
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
    except OSError:
        sink.transport.abort()


async def proxy_metric(proxy: Any, sample: str) -> float:
    port = int(proxy.env["AUBE_OPERATOR_PORT"])
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(b"GET /_aube/metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        body = b""
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
            while True:
                body += await stream.receive()
    for line in body.decode().splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def differences(results: dict[str, dict[str, dict[str, str]]]) -> list[str]:
    """Where the paths' verdicts differ, other than an OK / NON-STRICT flip on a case named in RACE_PRONE."""
    direct = results["direct"]
    found = []
    for path, agents in results.items():
        for agent, verdicts in agents.items():
            assert verdicts.keys() == direct[agent].keys(), f"{path} ran other cases for {agent}"
            for case, verdict in verdicts.items():
                expected = direct[agent][case]
                if verdict == expected:
                    continue
                if case in RACE_PRONE and {verdict, expected} <= {"OK", "NON-STRICT"}:
                    continue
                found.append(f"{agent} {case}: direct {expected}, {path} {verdict}")
    return found


def summary(results: dict[str, dict[str, dict[str, str]]]) -> str:
    lines = []
    for path, agents in results.items():
        for agent, verdicts in agents.items():
            counts = Counter(verdicts.values())
            lines.append(
                f"{path:8} {agent:6} {len(verdicts)} cases: " + ", ".join(sorted(f"{k} {v}" for k, v in counts.items()))
            )
    failed = sorted(
        {
            f"{a} {c}"
            for agents in results.values()
            for a, v in agents.items()
            for c, b in v.items()
            if b not in ("OK", "NON-STRICT", "INFORMATIONAL")
        }
    )
    return "\n".join([*lines, f"neither OK nor NON-STRICT: {', '.join(failed) or 'none'}"])


def wstest_or_skip() -> None:
    if WSTEST.exists():
        return
    why = f"no {WSTEST.relative_to(REPO)} (scripts/setup.sh installs it where it finds Python 2.7)"
    if os.environ.get("AUBE_REQUIRE_DOCKER") == "1":
        pytest.fail(f"AUBE_REQUIRE_DOCKER=1 (CI) but {why}")
    pytest.skip(why)


async def upload(nc: NATS, name: str, source: str) -> None:
    body = UploadRequest(name=name, zip=zip_files({"fn.py": source, "aube.toml": MANIFEST}))
    reply = await request(nc, names.SUBJECT_UPLOAD, body, UploadReply, 300)
    assert reply.ok, reply


async def test_fuzzing_client_sees_the_same_results_direct_handed_off_and_relayed(platform, tmp_path) -> None:  # type: ignore[no-untyped-def]
    wstest_or_skip()
    await platform.start_controlplane()
    handoff_port, handoff_proxy = await platform.start_proxy(AUBE_HANDOFF="auto")
    relay_port, relay_proxy = await platform.start_proxy(AUBE_HANDOFF="off")
    results: dict[str, dict[str, dict[str, str]]] = {}
    async with nats_client(platform.nats_url) as (nc, registry):
        direct_urls = {}
        servers = []
        for agent, source in ECHO.items():
            await upload(nc, f"echo-{agent}", source)
            entry = (await wait_free(registry, f"echo-{agent}", 2))[0]
            if addresses.handoff_path(entry.record.address) is None:
                pytest.skip("instances listen on TCP here (no sandbox): no socket handoff to compare")
            forwarder = CredentialForwarder(entry.record.address, entry.record.secret)
            servers.append(await forwarder.start())
            direct_urls[agent] = f"ws://127.0.0.1:{forwarder.port}/echo-{agent}"
        # Straight to one instance of each function; no proxy sends anyone else to it meanwhile (no other client).
        results["direct"] = await fuzz(tmp_path, "direct", direct_urls)
        for server in servers:
            server.close()
        for path, port in (("handoff", handoff_port), ("relay", relay_port)):
            urls = {agent: f"ws://127.0.0.1:{port}/echo-{agent}" for agent in ECHO}
            results[path] = await fuzz(tmp_path, path, urls)
    report = summary(results)
    print(report)
    (tmp_path / "summary.txt").write_text(report + "\n")
    # The paths were what they say: every handed-off stream passed the proxy by, every relayed one went through it.
    for agent in ECHO:
        sample = f'aube_streams_handed_off_total{{function="echo-{agent}"}}'
        assert await proxy_metric(handoff_proxy, sample) == len(results["handoff"][agent])
        assert await proxy_metric(relay_proxy, sample) == 0
    assert await proxy_metric(handoff_proxy, 'aube_relayed_bytes_total{direction="instance_to_client"}') == 0
    assert differences(results) == [], report
