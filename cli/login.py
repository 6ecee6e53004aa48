"""`aube login [FILE]`: keep a tenant's credentials where the CLI finds them from any folder.

The per-user file (credsearch.user_credentials_file, ~/.config/aube/credentials.env) is written with mode 0600 in
a folder of mode 0700: it holds a password. `aube login FILE` copies a credentials file there (`-` reads one from
stdin); plain `aube login` copies the platform folder's (.data/credentials.env, found as credsearch finds it) or,
on a terminal, asks for the user and password. `aube start` writes the default tenant's there the first time it
creates them, unless the user has a file there already (`remember_default_login`).
"""

from __future__ import annotations

import getpass
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from aube.cli import credsearch
from aube.shared import credentials
from aube.shared.errors import InvalidRequest


def save(login: credentials.Login, path: Path, *, nats_url: str = "") -> None:
    """Write `login` to `path` (0600) in a folder only its owner may enter (0700)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.parent.chmod(0o700)  # an existing folder too: it is ours, and it holds a password
    credentials.write_login(path, login, nats_url=nats_url)


def remember_default_login(login: credentials.Login, environ: Mapping[str, str], nats_url: str = "") -> Path | None:
    """`aube start` made the default tenant's credentials: keep them in the user's file too, unless the user has
    one (which may be another platform's or tenant's: never overwritten). The path written, or None."""
    path = credsearch.user_credentials_file(environ)
    if path.exists():
        return None
    save(login, path, nats_url=nats_url)
    return path


def _read_source(source: str, cwd: Path) -> tuple[credentials.Login, str, str]:
    """The login and servers of a credentials file (`-`: stdin), and what to call it."""
    if source == "-":
        with tempfile.TemporaryDirectory() as folder:
            copy = Path(folder) / "stdin.env"
            copy.write_text(sys.stdin.read())
            return _read_file(copy, "stdin")
    path = Path(source).expanduser()
    return _read_file(path if path.is_absolute() else cwd / path, source)


def _read_file(path: Path, label: str) -> tuple[credentials.Login, str, str]:
    login = credentials.load_login(path)
    if login is None:
        raise InvalidRequest(
            f"{label} holds no credentials: a credentials file has lines {credentials.ENV_USER}=<tenant> and "
            f"{credentials.ENV_DEPLOYER_PASSWORD}=<password> (what `aube tenant add` writes)"
        )
    return login, credentials.servers_of(path), label


def _prompt(environ: Mapping[str, str]) -> tuple[credentials.Login, str, str]:
    user = input(f"tenant (NATS user) [{credentials.DEPLOYER_USER}]: ").strip() or credentials.DEPLOYER_USER
    password = getpass.getpass("password: ").strip()
    if not password:
        raise InvalidRequest("no password given")
    servers = input(f"NATS servers [{environ.get(credentials.ENV_NATS_URL) or 'default'}]: ").strip()
    return credentials.Login(user=user, password=password), servers, "the terminal"


def login(source: str | None, environ: Mapping[str, str], cwd: Path) -> tuple[Path, str]:
    """`aube login [FILE]`: the user's file written (replacing any), and where its login came from."""
    if source is not None:
        found, servers, label = _read_source(source, cwd)
    else:
        platform = [p for p in credsearch.search(None, {}, cwd).places if p.origin == credsearch.PLATFORM_FOLDER]
        here = credsearch.locate(credsearch.Search(places=platform))
        if here is not None:
            found, servers, label = _read_file(here.path, str(here.path))
        elif sys.stdin.isatty():
            found, servers, label = _prompt(environ)
        else:
            raise InvalidRequest(
                "name a credentials file (aube login FILE, or - for stdin): no .data/credentials.env in this folder "
                "or above it, and no terminal to ask on"
            )
    path = credsearch.user_credentials_file(environ)
    save(found, path, nats_url=servers)
    return path, label


def run(source: str | None) -> int:
    path, label = login(source, os.environ, Path.cwd())
    print(f"credentials from {label} saved to {path}: aube uses them from any folder")
    return 0
