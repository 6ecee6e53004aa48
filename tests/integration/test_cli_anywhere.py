"""The `aube` command run as a deployer runs it: from a folder outside the checkout, with a home of its own.

A real nats-server on deploy/nats.conf (tenants `deployer` and `alice`), a real control plane on the process
runtime, and the installed `aube` command as a subprocess; HOME points at a temporary folder, so the only
credentials it can find are those a test puts there (issue 12: the CLI worked only from the checkout).
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from harness import Platform
from support import AccountsServer, accounts_server

from aube.shared import credentials

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
FUNCTION = REPO / "examples" / "reverse-async"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


class Deployer:
    """A deployer's machine: a home, a working folder outside the checkout, and the `aube` command."""

    def __init__(self, accounts: AccountsServer, platform: Platform, tmp: Path) -> None:
        self.accounts = accounts
        self.platform = platform
        self.home = tmp / "home"
        self.cwd = tmp / "work" / "projects"
        self.home.mkdir()
        self.cwd.mkdir(parents=True)
        self.function = self.cwd / "greet"
        shutil.copytree(FUNCTION, self.function, ignore=shutil.ignore_patterns("__pycache__"))
        installed = Path(sys.executable).parent / "aube"
        self.argv = [str(installed)] if installed.exists() else [sys.executable, "-m", "aube.cli"]

    @property
    def user_file(self) -> Path:
        return self.home / ".config" / "aube" / "credentials.env"

    def env(self, **extra: str) -> dict[str, str]:
        # Nothing of the test runner's Aube settings, its home or its XDG folders leaks in.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AUBE_", "XDG_"))}
        env.update({"HOME": str(self.home), "AUBE_NATS_URL": self.accounts.url, "AUBE_CLI_TIMEOUT": "300", **extra})
        return env

    def aube(self, *argv: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.argv, *argv], env=self.env(**extra), cwd=self.cwd, capture_output=True, text=True, timeout=320
        )

    def on_terminal(self, *argv: str) -> list[tuple[float, str]]:
        """Run `aube` with a pseudo-terminal as its stdin, stdout and stderr; what it wrote, read by read, timed."""
        master, child = pty.openpty()
        env = self.env(TERM="xterm-256color", COLUMNS="120", LINES="40")
        proc = subprocess.Popen([*self.argv, *argv], env=env, cwd=self.cwd, stdin=child, stdout=child, stderr=child)
        os.close(child)
        chunks: list[tuple[float, str]] = []
        deadline = time.monotonic() + 320
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 1.0)
                if not ready:
                    if proc.poll() is not None:
                        break
                    continue
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed its end
                    break
                if not data:
                    break
                chunks.append((time.monotonic(), data.decode(errors="replace")))
            assert proc.wait(timeout=30) == 0, "".join(text for _, text in chunks)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(master)
        return chunks


@pytest.fixture
def deployer(platform_on: Any, tmp_path: Path) -> Iterator[Deployer]:
    with accounts_server(tmp_path / "data", tenants=["alice"]) as accounts:
        machine = Deployer(accounts, platform_on(accounts.url), tmp_path)
        try:
            yield machine
        finally:
            machine.platform.stop_all()  # before the server goes; platform_on checks for leftovers


def no_traceback(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_without_credentials_anywhere_the_cli_says_where_it_looked(deployer: Deployer) -> None:
    for argv in (("ls",), ("deploy", "greet", "greet")):
        done = deployer.aube(*argv)
        assert done.returncode == 1, done.stderr
        no_traceback(done)
        assert "credentials_missing" in done.stderr
        assert str(deployer.user_file) in done.stderr
        assert str(deployer.cwd / ".data" / "credentials.env") in done.stderr
        assert "each folder above it" in done.stderr and "aube login" in done.stderr
    # XDG_CONFIG_HOME moves the user's file, and the message says so.
    moved = deployer.aube("ls", XDG_CONFIG_HOME=str(deployer.home / "cfg"))
    assert str(deployer.home / "cfg" / "aube" / "credentials.env") in moved.stderr


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_a_refused_password_is_told_with_its_file_and_no_traceback(deployer: Deployer, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.env"
    credentials.write_login(wrong, credentials.Login(user="alice", password="Wrongpassword"))
    # The user's own file is right, but $AUBE_CREDENTIALS comes first: its wrong password is refused, and named.
    assert deployer.aube("login", str(deployer.accounts.data / "tenants" / "alice.env")).returncode == 0
    for done in (
        deployer.aube("ls", AUBE_CREDENTIALS=str(wrong)),
        deployer.aube("--credentials", str(wrong), "deploy", "greet", "greet"),
    ):
        assert done.returncode == 1
        no_traceback(done)
        assert "credentials_refused" in done.stderr and "refused the credentials in" in done.stderr
        assert str(wrong) in done.stderr and "'alice'" in done.stderr
        assert "Wrongpassword" not in done.stderr
    # A missing server is not a refusal.
    gone = deployer.aube("ls", AUBE_NATS_URL="nats://127.0.0.1:9")
    assert gone.returncode == 1 and "unavailable" in gone.stderr and "refused the credentials" not in gone.stderr
    no_traceback(gone)


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_after_aube_login_deploy_works_from_anywhere_and_prints_json_when_piped(deployer: Deployer) -> None:
    await deployer.platform.start_controlplane(**deployer.accounts.service_env("controlplane"))
    logged_in = deployer.aube("login", str(deployer.accounts.data / "tenants" / "alice.env"))
    assert logged_in.returncode == 0, logged_in.stderr
    assert str(deployer.user_file) in logged_in.stdout
    assert oct(deployer.user_file.stat().st_mode & 0o777) == "0o600"
    assert oct(deployer.user_file.parent.stat().st_mode & 0o777) == "0o700"

    # Piped (not a terminal): quiet, one JSON object, the reply.
    done = deployer.aube("deploy", "greet", "greet")
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["ok"] is True and reply["name"] == "greet" and reply["version"] == 1
    assert reply["url"].endswith("/greet")
    assert done.stderr == ""

    # --json --events: a JSON line per step of this upload, the reply last.
    again = deployer.aube("deploy", "--json", "--events", "greet", "greet")
    assert again.returncode == 0, again.stderr
    lines = [json.loads(line) for line in again.stdout.splitlines()]
    steps = [line["event"] for line in lines[:-1]]
    assert steps[0] == "accepted" and steps[-1] == "ready", steps
    assert {line["version"] for line in lines[:-1]} == {2}
    assert lines[-1] == {**reply, "version": 2}

    # Another tenant (--credentials beats the user's file) is refused the name: an error reply as JSON, status 1.
    taken = deployer.aube(
        "deploy", "--json", "--credentials", str(deployer.accounts.data / "credentials.env"), "greet", "greet"
    )
    assert taken.returncode == 1
    no_traceback(taken)
    assert json.loads(taken.stdout)["error"]["code"] == "name_taken"
    assert "error: name_taken:" in taken.stderr

    # --quiet: the stream URL alone (scripts/upload.sh's output).
    quiet = deployer.aube("deploy", "-q", "greet", "greet")
    assert quiet.returncode == 0 and quiet.stdout.strip() == reply["url"], quiet.stderr


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_deploy_on_a_terminal_shows_its_steps_as_they_happen(deployer: Deployer) -> None:
    await deployer.platform.start_controlplane(**deployer.accounts.service_env("controlplane"))
    assert deployer.aube("login", str(deployer.accounts.data / "tenants" / "alice.env")).returncode == 0
    chunks = await anyio.to_thread.run_sync(deployer.on_terminal, "deploy", "greet", "greet")
    text = ANSI.sub("", "".join(part for _, part in chunks))

    def first_read_with(needle: str) -> int:
        seen = ""
        for i, (_, part) in enumerate(chunks):
            seen += ANSI.sub("", part)
            if needle in seen:
                return i
        raise AssertionError(f"{needle!r} never shown:\n{text}")

    assert re.search(r"accepted\s+version 1", text), text
    assert re.search(r"ready\s+version 1, 1 warm instance", text), text
    assert "deployed greet version 1: ws://" in text
    # The steps came while the upload ran, each before the final result, not all at its end.
    assert first_read_with("accepted") < first_read_with("deployed greet")
    assert text.index("accepted") < text.index("ready") < text.index("deployed greet")
    assert not text.lstrip().startswith("{"), "a terminal gets no JSON"
