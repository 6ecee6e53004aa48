"""The process runtime's zygotes (`zygote.py`): one per function version, started on demand, restarted when gone.

A zygote is a child of the control plane, reached through a SOCK_SEQPACKET socket pair; it exits when its end of the
pair reads end of file, so with the control plane, while the instances forked from it do not: they belong to their
bubblewrap sandboxes.
One request at a time per zygote (a fork takes milliseconds). A zygote that is gone (crashed, killed) is noticed
at the next request: it is started anew and the request sent again, once; a second failure is the caller's to
handle (the runtime then starts the instance without a zygote).
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import resource
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import anyio.to_thread

from aube.controlplane.runtimes import sandbox

logger = logging.getLogger(__name__)

MODULE = "aube.controlplane.runtimes.zygote"
# A fork plus two setns() and a reply take milliseconds; a zygote still importing the server at its first request
# takes a few hundred.
REPLY_TIMEOUT = 30.0
# A zygote that forked nothing for this long is stopped (the next start of its version starts another).
IDLE_STOP = 600.0
MAX_REPLY = 1 << 16


class ZygoteFailure(Exception):
    """The zygote could not fork the instance (it is gone, or the fork failed: the message says which)."""


class ZygoteOutOfStep(ZygoteFailure):
    """No answer came to a request (the channel failed or timed out): a late answer would be read as the next
    request's, so the zygote is not used again."""


class Zygote:
    def __init__(self, proc: subprocess.Popen[bytes], channel: socket.socket) -> None:
        self.proc = proc
        self.channel = channel
        self.lock = anyio.Lock()
        self.used = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fork(self, request: dict[str, object], fds: list[int]) -> int:
        """Blocking: send one request with its descriptors, return the instance's host pid."""
        try:
            self.channel.sendmsg(
                [json.dumps(request).encode()],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())],
            )
            data = self.channel.recv(MAX_REPLY)
        except OSError as e:  # EPIPE, ECONNRESET, a timeout: the zygote is gone or stuck
            raise ZygoteOutOfStep(f"zygote {self.pid} did not answer: {e}") from e
        if not data:
            raise ZygoteOutOfStep(f"zygote {self.pid} closed its channel")
        try:
            reply = json.loads(data)
        except ValueError as e:
            raise ZygoteOutOfStep(f"zygote {self.pid} answered something unreadable") from e
        if "pid" not in reply:
            raise ZygoteFailure(f"zygote {self.pid} could not fork the instance: {reply.get('error')}")
        return int(reply["pid"])

    def close(self) -> None:
        self.channel.close()  # the zygote reads end of file and exits
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=2)


def start_zygote(seccomp_program: bytes) -> Zygote:
    """Blocking: start a zygote and hand it the seccomp filter (its first message). Its stderr is ours: what it
    says (a failure of its own; an instance's errors go to the instance's log) is the control plane's to show."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-m", MODULE],
            stdin=theirs.fileno(),
            stdout=subprocess.DEVNULL,
            cwd="/",
            # Nothing of the control plane's environment: every instance's /proc/self/environ shows this one.
            env={"PATH": sandbox.SANDBOX_PATH, "LANG": "C.UTF-8", "MALLOC_ARENA_MAX": "2"},
            close_fds=True,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    ours.settimeout(REPLY_TIMEOUT)
    ours.send(seccomp_program)
    return Zygote(proc, ours)


class Zygotes:
    """The zygotes of this control plane, by version folder."""

    def __init__(self) -> None:
        self._by_version: dict[str, Zygote] = {}
        self._starting = anyio.Lock()

    def pids(self) -> set[int]:
        return {zygote.pid for zygote in self._by_version.values()}

    def pid(self, version: str) -> int | None:
        zygote = self._by_version.get(version)
        return zygote.pid if zygote is not None else None

    async def fork(self, version: str, seccomp_program: bytes, request: dict[str, object], fds: list[int]) -> int:
        """The instance's host pid, forked from the version's zygote (started, or restarted once, if need be)."""
        for attempt in (1, 2):
            zygote = await self._zygote(version, seccomp_program)
            async with zygote.lock:
                zygote.used = time.monotonic()
                try:
                    return await anyio.to_thread.run_sync(zygote.fork, request, fds)
                except ZygoteOutOfStep:
                    alive = zygote.alive()
                    self._forget(version, zygote)  # stuck or gone: never asked again
                    if alive or attempt == 2:
                        raise
                    logger.warning("zygote %d of %s is gone (status %s): starting another", zygote.pid, version,
                                   zygote.proc.returncode)  # fmt: skip
        raise AssertionError("unreachable")

    async def stop(self, version: str) -> None:
        zygote = self._by_version.pop(version, None)
        if zygote is not None:
            await anyio.to_thread.run_sync(zygote.close)

    async def stop_idle(self, idle: float) -> None:
        """Stop the zygotes that forked nothing for `idle` seconds: each holds some 25 MB, and a version whose
        instances come and go rarely pays one interpreter start to get a new one."""
        now = time.monotonic()
        for version, zygote in list(self._by_version.items()):
            if now - zygote.used > idle and not zygote.lock.locked():
                logger.info("zygote %d of %s idle for %.0fs: stopped", zygote.pid, version, now - zygote.used)
                await self.stop(version)

    async def close(self) -> None:
        for version in list(self._by_version):
            await self.stop(version)

    async def _zygote(self, version: str, seccomp_program: bytes) -> Zygote:
        async with self._starting:
            zygote = self._by_version.get(version)
            if zygote is not None and not zygote.alive():
                logger.warning("zygote %d of %s has exited (status %s): starting another", zygote.pid, version,
                               zygote.proc.returncode)  # fmt: skip
                self._forget(version, zygote)
                zygote = None
            if zygote is None:
                zygote = await anyio.to_thread.run_sync(start_zygote, seccomp_program)
                self._by_version[version] = zygote
                logger.info("started zygote %d for %s", zygote.pid, version)
            return zygote

    def _forget(self, version: str, zygote: Zygote) -> None:
        if self._by_version.get(version) is zygote:
            del self._by_version[version]
        zygote.close()


def fork_request(
    env: dict[str, str], ids: tuple[int, int], limits: dict[str, int], procs: list[str]
) -> dict[str, object]:
    """What the fork needs (zygote.py's request; the holder's pid is added once it is known)."""
    return {
        "env": env,
        "uid": ids[0],
        "gid": ids[1],
        "rlimits": [[getattr(resource, key), value] for key, value in limits.items()],
        "procs": procs,
        "fn_dir": sandbox.SANDBOX_FN_DIR,
        "deps_dir": sandbox.SANDBOX_DEPS_DIR,
    }


def _ready(fd: int, timeout: float) -> bool:
    ready, _, _ = select.select([fd], [], [], timeout)
    return bool(ready) and os.read(fd, 1) == b"r"


def _sandbox_pid(leader: int) -> int | None:
    """The sandbox's pid 1 (the holder) as the host sees it: bubblewrap's one child."""
    try:
        children = Path(f"/proc/{leader}/task/{leader}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if len(children) == 1 else None


async def fork_into(
    zygotes: Zygotes,
    version: str,
    seccomp_program: bytes,
    leader: int,
    ready_fd: int,
    keep_fd: int,
    out_dir: Path,
    request: dict[str, object],
    timeout: float,
) -> int:
    """Once the holder bubblewrap runs as `leader`'s sandbox says it is ready, fork the instance into it."""
    if not await anyio.to_thread.run_sync(_ready, ready_fd, timeout):
        raise ZygoteFailure("the sandbox did not come up")
    target = _sandbox_pid(leader)
    if target is None:
        raise ZygoteFailure(f"no sandbox below bubblewrap {leader}")
    # The instance's stdout and stderr: the files of its output folder (output.py reads them for `aube logs`).
    out_fd = os.open(out_dir / "stdout", os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        err_fd = os.open(out_dir / "stderr", os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            return await zygotes.fork(
                version, seccomp_program, {**request, "target": target, "leader": leader}, [out_fd, err_fd, keep_fd]
            )
        finally:
            os.close(err_fd)
    finally:
        os.close(out_fd)
