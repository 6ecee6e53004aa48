"""Acceptance of `aube new` and `aube connect` (issue 12) on a real platform: nats-server on deploy/nats.conf with
tenants, control plane and proxy as processes, the CLI run as a user runs it (a subprocess in a folder outside the
checkout, the tenant's credentials from AUBE_CREDENTIALS).

Every style `aube new` writes deploys as written and round-trips a message through `aube connect`; `aube connect`
prints the platform's refusal (status and body) for an unknown function, a missing or foreign subprotocol and a
missing token, and exits non-zero; another tenant's lookup is not given the function's URL.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import ByteReceiveStream, Process
from support import AccountsServer, accounts_server

from aube.cli import connect, scaffold
from aube.shared.natsserver import free_port

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
TOKEN = "open-sesame-7f3a"


@dataclass
class Deployed:
    """A running platform whose proxy listens on `port` (the control plane's public URL names it)."""

    accounts: AccountsServer
    platform: Any  # harness.Platform, its services not started yet (`start`)
    port: int
    work: Path  # a folder outside the checkout, where the user works

    @property
    def base(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def env(self, tenant: str = "deployer", **extra: str) -> dict[str, str]:
        """A user's environment: no AUBE_* or proxy setting of the machine's, the tenant's credentials file."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUBE_") and "proxy" not in k.lower()}
        creds = self.accounts.data / ("credentials.env" if tenant == "deployer" else f"tenants/{tenant}.env")
        env.update(AUBE_NATS_URL=self.accounts.url, AUBE_CREDENTIALS=str(creds), **extra)
        return env

    async def aube(
        self, *argv: str, cwd: Path | None = None, stdin: bytes | None = None, tenant: str = "deployer", **env: str
    ) -> subprocess.CompletedProcess[bytes]:
        with anyio.fail_after(300):
            return await anyio.run_process(
                [sys.executable, "-m", "aube.cli", *argv],
                cwd=cwd or self.work,
                env=self.env(tenant, **env),
                input=stdin if stdin is not None else b"",
                check=False,
            )

    async def deploy(self, folder: Path, name: str) -> None:
        done = await self.aube("deploy", "--quiet", ".", name, cwd=folder)
        assert done.returncode == 0, done.stderr.decode()
        assert done.stdout.decode().strip() == f"{self.base}/{name}"  # the deploy reply's URL names our proxy


@pytest.fixture
def deployed(platform_on: Any, tmp_path: Path) -> Iterator[Deployed]:
    work = tmp_path / "work"
    work.mkdir()
    assert not work.resolve().is_relative_to(REPO)
    with accounts_server(tmp_path / "data-nats", tenants=["alice"]) as accounts:
        platform = platform_on(accounts.url)
        try:
            yield Deployed(accounts, platform, free_port(), work)
        finally:
            platform.stop_all()  # before the server goes; the fixture checks for leftovers


async def start(deployed: Deployed) -> None:
    """The control plane (its replies' URLs name our proxy) and the proxy, each with its own login."""
    accounts, platform = deployed.accounts, deployed.platform
    await platform.start_controlplane(**accounts.service_env("controlplane"), AUBE_PUBLIC_URL=deployed.base)
    await platform.start_proxy(AUBE_PROXY_PORT=str(deployed.port), **accounts.service_env("proxy"))


@asynccontextmanager
async def interactive(deployed: Deployed, *argv: str, cwd: Path) -> AsyncIterator[Process]:
    """`aube connect ...` with its stdin, stdout and stderr as pipes, as in a terminal."""
    async with await anyio.open_process(
        [sys.executable, "-m", "aube.cli", "connect", *argv], cwd=cwd, env=deployed.env()
    ) as proc:
        yield proc


async def read_line(stream: ByteReceiveStream) -> str:
    data = b""
    with anyio.fail_after(120):
        while not data.endswith(b"\n"):
            data += await stream.receive()
    return data.decode()


async def read_all(stream: ByteReceiveStream) -> str:
    data = b""
    with anyio.fail_after(60):
        try:
            while True:
                data += await stream.receive()
        except anyio.EndOfStream:
            pass
    return data.decode()


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_every_style_from_aube_new_deploys_and_round_trips_through_aube_connect(deployed: Deployed) -> None:
    await start(deployed)
    for style in scaffold.STYLES:
        name = f"hello-{style}"
        made = await deployed.aube("new", name, "--style", style)
        assert made.returncode == 0, made.stderr.decode()
        assert f"aube connect {name}" in made.stdout.decode()
        folder = deployed.work / name
        await deployed.deploy(folder, name)
        # Interactive: a line typed, its reply printed; the URL comes from the platform's list (no --url).
        async with interactive(deployed, name, "--linger", "0.5", cwd=folder) as proc:
            assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
            await proc.stdin.send(b"hello aube\n")
            assert await read_line(proc.stdout) == "ebua olleh\n", style
            await proc.stdin.aclose()  # Ctrl-D: the client closes the stream
            errors = await read_all(proc.stderr)
            with anyio.fail_after(30):
                assert await proc.wait() == 0, errors
        assert f"connected to {deployed.base}/{name}" in errors
        assert "closed: 1000 (OK)" in errors
    # Piped, binary: the client waits for the reply after stdin has ended, and prints binary as hex.
    piped = await deployed.aube("connect", "hello-sync", "--binary", "--linger", "5", stdin=b"abc\n")
    assert piped.returncode == 0, piped.stderr.decode()
    assert piped.stdout.decode() == "(binary) 636261\n"


CHAT = """subprotocols = ["chat.v2", "chat.v1"]


async def fn(websocket):
    async for message in websocket:
        await websocket.send(f"{websocket.subprotocol}:{message}")
"""


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_connect_prints_the_platforms_refusal_and_exits_non_zero(deployed: Deployed) -> None:
    await start(deployed)
    chat = deployed.work / "chat"
    assert (await deployed.aube("new", "chat", "--style", "async")).returncode == 0
    (chat / "fn.py").write_text(CHAT)
    await deployed.deploy(chat, "chat")
    private = deployed.work / "private"
    assert (await deployed.aube("new", "private")).returncode == 0
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    toml = (private / "aube.toml").read_text()
    (private / "aube.toml").write_text(toml.replace("# tokens_sha256 = []", f'tokens_sha256 = ["{digest}"]#'))
    await deployed.deploy(private, "private")

    async def refused(*argv: str, **env: str) -> str:
        done = await deployed.aube("connect", *argv, stdin=b"never sent\n", **env)
        assert done.returncode == 1, (argv, done.stderr.decode())
        assert done.stdout == b"", argv
        return done.stderr.decode()

    # An unknown function: the proxy's 404 and its reason (the base URL from $AUBE_PUBLIC_URL).
    unknown = await refused("nope", AUBE_PUBLIC_URL=deployed.base)
    assert "error: refused: HTTP 404 Not Found: unknown function 'nope'" in unknown
    # A function that declares subprotocols refuses a client that offers none of them, or none at all, with 400.
    none_offered = await refused("chat")
    assert "error: refused: HTTP 400 Bad Request: Failed to open a WebSocket connection: missing subprotocol" in (
        none_offered
    )
    foreign = await refused("chat", "--subprotocol", "other")
    assert "HTTP 400 Bad Request: Failed to open a WebSocket connection: invalid subprotocol; expected one of " in (
        foreign
    )
    assert "chat.v2, chat.v1" in foreign
    spoken = await deployed.aube(
        "connect", "chat", "--subprotocol", "chat.v1", "--subprotocol", "chat.v2", "--linger", "5", stdin=b"hi\n"
    )
    assert spoken.returncode == 0, spoken.stderr.decode()
    assert spoken.stdout.decode() == "chat.v2:hi\n"  # the function's first choice among those offered
    assert "(subprotocol chat.v2)" in spoken.stderr.decode()
    # A function with [access] tokens: 401 without the token, served with it (as a bearer token, the documented way).
    assert "error: refused: HTTP 401 Unauthorized: this function needs a valid bearer token" in await refused("private")
    assert "HTTP 401" in await refused("private", "--token", "wrong")
    for how, env in ((["--token", TOKEN], {}), ([], {"AUBE_STREAM_TOKEN": TOKEN})):
        served = await deployed.aube("connect", "private", *how, "--linger", "5", stdin=b"abc\n", **env)
        assert served.returncode == 0, served.stderr.decode()
        assert served.stdout.decode() == "cba\n"
        assert TOKEN not in served.stderr.decode()
    # The function closes the stream: its close code and reason are printed, and a code other than 1000 fails.
    boom = deployed.work / "boom"
    assert (await deployed.aube("new", "boom")).returncode == 0
    (boom / "fn.py").write_text("def fn(websocket):\n    raise ValueError(f'cannot take {websocket.recv()!r}')\n")
    await deployed.deploy(boom, "boom")
    ended = await deployed.aube("connect", "boom", stdin=b"this\n")
    assert ended.returncode == 1
    assert "closed: 1011 (internal error) ValueError: cannot take 'this'" in ended.stderr.decode()


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_another_tenants_lookup_is_not_given_the_functions_url(
    deployed: Deployed, monkeypatch: pytest.MonkeyPatch
) -> None:
    await start(deployed)
    folder = deployed.work / "mine"
    assert (await deployed.aube("new", "mine")).returncode == 0
    await deployed.deploy(folder, "mine")
    args = argparse.Namespace(nats=deployed.accounts.url, timeout=30.0, url="")
    for key, value in deployed.env().items():
        if key.startswith("AUBE_"):
            monkeypatch.setenv(key, value)
    assert await connect.listed_url(args, "mine") == f"{deployed.base}/mine"
    monkeypatch.setenv("AUBE_CREDENTIALS", deployed.env("alice")["AUBE_CREDENTIALS"])
    assert await connect.listed_url(args, "mine") is None  # alice lists only her own functions
    # alice's `aube connect mine` without a URL therefore tries the default base, not the deployer's proxy.
    tried = await deployed.aube("connect", "mine", "--linger", "0", tenant="alice")
    assert f"{deployed.base}/mine" not in tried.stderr.decode()
