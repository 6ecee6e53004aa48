"""A Docker instance's handoff folder: where it takes clients' own sockets from a proxy of this host.

The process runtime's sandboxed instances have a folder of their own already (their Unix socket's, see process.py),
and take handed-off sockets in it. A container gets one the same way: a host folder per instance (root's control
plane: `/run/aube-docker/<owner>/<instance id>`, see `DockerRuntime`), bind-mounted at CONTAINER_DIR, first the
instance user's (it binds `handoff.sock` there), then, once the socket is there, root's with mode 0700 (`lock`), so
the function can swap nothing there and only the platform reaches it (the same rule as `stage.lock_run_dir`). An
instance that does not listen there in time is simply relayed (`lock` says so). The folder goes with the container
(`remove`).

Blocking file calls: run them off the event loop.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import time
from pathlib import Path

from aube.shared import addresses

CONTAINER_DIR = "/aube/run"
ENV_HANDOFF = "AUBE_INSTANCE_HANDOFF"
POLL = 0.05


def make(path: Path, uid: int, gid: int) -> None:
    """The instance's folder, its user's (0700), under parents only root may change."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    os.chown(path, uid, gid)


def wait_listening(path: Path, timeout: float) -> bool:
    """Whether the instance's handoff socket appeared within `timeout` (its server listens by then)."""
    deadline = time.monotonic() + timeout
    while not _is_socket(path / addresses.HANDOFF_SOCKET_NAME):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL)
    return True


def lock(path: Path, timeout: float) -> str:
    """Once the instance's handoff socket is there: the folder becomes root's; the socket's host path, or "" when
    it did not appear within `timeout` or is something else (the instance is then relayed)."""
    sock = path / addresses.HANDOFF_SOCKET_NAME
    deadline = time.monotonic() + timeout
    while not _is_socket(sock):
        if time.monotonic() > deadline:
            return ""
        time.sleep(POLL)
    os.chown(path, 0, 0)
    os.chmod(path, 0o700)
    return str(sock) if _is_socket(sock) else ""


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False
