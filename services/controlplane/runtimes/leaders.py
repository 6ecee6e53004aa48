"""The process runtime's instances as processes: their session leaders in /proc, our children, signals and exits.

Apart from the runtime (`process.py`) because none of it needs the runtime's state: reading a leader's stat and
environment (`read_stat`, `read_info`, `scan_leaders`), signalling an instance's tree without ever hitting a
recycled pid (`signal_instance`), collecting the exit status of what this process started or adopted as a
subreaper (`CHILDREN`, `reap`, `reap_all`), and noticing an exit the moment it happens (`ExitWatch`: one pidfd
per leader, read by the event loop; a pidfd does not need the process to be a child, so adopted leaders work too).
The decisions over what is read here (which process is a leader, which to signal) are pure, in `sandbox.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import subprocess
from pathlib import Path

import anyio

from aube.controlplane.runtimes import sandbox
from aube.controlplane.runtimes.base import ExitListener

# Our children, by pid. They belong to this OS process rather than to one ProcessRuntime: a runtime that is
# closed and made anew (as after a reconnect) must still reap the instances the first one started, and a
# Popen dropped while its child runs would warn.
CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
PR_GET_CHILD_SUBREAPER = 37
_libc = ctypes.CDLL(None, use_errno=True)


class ExitWatch:
    """One pidfd per watched leader, read by the event loop; `exited(handle)` once each becomes readable."""

    def __init__(self, loop: asyncio.AbstractEventLoop, exited: ExitListener) -> None:
        self._loop = loop
        self._exited = exited
        self._fds: dict[str, int] = {}

    def add(self, handle: str) -> None:
        if handle in self._fds:
            return
        pid, starttime = sandbox.parse_handle(handle)
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._loop.call_soon(self._exited, handle)
            return
        # The pidfd names whatever has this pid now: if that is not the leader (it ended and the pid was reused,
        # or it is a zombie), the instance is gone already.
        if sandbox.is_gone(read_stat(pid), starttime):
            os.close(fd)
            self._loop.call_soon(self._exited, handle)
            return
        self._fds[handle] = fd
        self._loop.add_reader(fd, self._ended, handle)

    def _ended(self, handle: str) -> None:
        self._forget(handle)
        pid, starttime = sandbox.parse_handle(handle)
        reap(pid, starttime)  # our child: collect its status now rather than leave a zombie until the next pass
        self._exited(handle)

    def _forget(self, handle: str) -> None:
        fd = self._fds.pop(handle, None)
        if fd is not None:
            self._loop.remove_reader(fd)
            os.close(fd)

    def close(self) -> None:
        for handle in list(self._fds):
            self._forget(handle)


async def wait_gone(pid: int, starttime: int, timeout: float, adopted: set[int] | None = None) -> bool:
    """`adopted` (a sandbox's stop): reap the zombies we adopted meanwhile, excluding these pids. A sandbox's pid 1
    ends only once every process of its namespace is reaped, an instance forked from a zygote included, and
    that one is ours to reap once its zygote is gone and we are a child subreaper."""
    with anyio.move_on_after(timeout):
        while True:
            reap(pid, starttime)
            if adopted is not None and is_subreaper():
                await anyio.to_thread.run_sync(reap_adopted, adopted)
            if sandbox.is_gone(read_stat(pid), starttime):
                return True
            await anyio.sleep(0.05)
    return False


# ---------------------------------------------------------------------------------------------------------
# Blocking (the runtime calls the slow ones in worker threads)


def read_stat(pid: int) -> sandbox.ProcStat | None:
    try:
        return sandbox.parse_stat(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError, IndexError):
        return None


def read_info(pid: int) -> sandbox.ProcInfo | None:
    stat = read_stat(pid)
    if stat is None:
        return None
    try:
        environ = sandbox.parse_environ(Path(f"/proc/{pid}/environ").read_bytes())
    except OSError:
        environ = {}
    return sandbox.ProcInfo(stat=stat, environ=environ)


def all_stats() -> list[sandbox.ProcStat]:
    stats = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := read_stat(int(entry))) is not None:
            stats.append(stat)
    return stats


def scan_leaders() -> list[sandbox.ProcInfo]:
    """Session leaders with their environment (everyone else cannot be an instance, so is not read)."""
    found = []
    for stat in all_stats():
        if stat.session != stat.pid:
            continue
        try:
            environ = sandbox.parse_environ(Path(f"/proc/{stat.pid}/environ").read_bytes())
        except OSError:  # gone meanwhile, or not ours to read
            continue
        found.append(sandbox.ProcInfo(stat=stat, environ=environ))
    return found


def signal_instance(pid: int, starttime: int, signum: int, sandboxed: bool) -> None:
    stats = all_stats()
    leader = next((s for s in stats if s.pid == pid), None)
    if sandbox.is_gone(leader, starttime):  # checked on the same snapshot: never signal a recycled pid
        return
    targets = sandbox.signal_targets(stats, pid, sandboxed=sandboxed)
    if sandboxed:
        # An instance forked from a zygote is in its sandbox's pid namespace but no descendant of bubblewrap.
        own = os.readlink("/proc/self/ns/pid")
        targets += sandbox.namespace_members(_pid_namespaces([s.pid for s in stats]), targets, own)
    for target in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(target, signum)
    if not sandboxed:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signum)


def _pid_namespaces(pids: list[int]) -> dict[int, str]:
    """Each process's pid namespace ("pid:[inode]"), for those still there."""
    found: dict[int, str] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            found[pid] = os.readlink(f"/proc/{pid}/ns/pid")
    return found


def reap(pid: int, starttime: int, wait: float = 0.0) -> None:
    """Collect the exit status of the instance if it is our child (no zombie is left); others reap their own.

    `wait` blocks (in a worker thread) for a child that was just signalled: `poll()` alone can miss a child that
    is still dying, or one whose status another thread is collecting at that moment, and leave a zombie behind.
    """
    proc = CHILDREN.get(pid)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait) if wait > 0 else proc.poll()
        if proc.returncode is not None:
            CHILDREN.pop(pid, None)  # another thread may reap the same child at the same moment
        return
    # Not started by this process, but it may still be our child: adopted when this process is a child
    # subreaper (prctl PR_SET_CHILD_SUBREAPER) and the control plane that started it died. Only that process,
    # named by its start time: never the recycled pid of another child of ours.
    stat = read_stat(pid)
    if stat is not None and stat.starttime == starttime and stat.state == "Z":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def is_subreaper() -> bool:
    flag = ctypes.c_int(0)
    _libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0)
    return flag.value != 0


def reap_adopted(keep: set[int]) -> None:
    """Collect zombies this process adopted as a child subreaper (an instance forked from a zygote, a zygote whose
    control plane died): they are no leader, so `reap` never names them. `keep`: our children whose status
    someone else collects (the zygotes' Popen objects)."""
    me = os.getpid()
    for stat in all_stats():
        if stat.ppid == me and stat.state == "Z" and stat.pid not in CHILDREN and stat.pid not in keep:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(stat.pid, os.WNOHANG)


def reap_all() -> None:
    for pid, proc in list(CHILDREN.items()):
        if proc.poll() is not None:
            CHILDREN.pop(pid, None)
