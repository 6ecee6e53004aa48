"""The host side of a sandboxed process instance: its files, its socket folder, the probe, and what its child does
between fork and exec, as root, before it becomes bubblewrap.

The child (`enter_stage`, `drop_privileges`; system calls only, through ctypes loaded at import, since it runs in
a child forked from a threaded process):
1. A private mount namespace with a tmpfs over STAGE_ROOT, and each host folder the sandbox needs bound there
   (`sandbox.stage_plan`): bubblewrap will run as an unprivileged uid that may not walk into those folders
   (a data dir under a 0700 folder, a Python under /root), and a bind of a folder needs no search permission on
   its parents. Nobody else sees these mounts; they go with the namespace when the instance ends.
2. The drop to the instance uid and gid (no supplementary groups), for good: bubblewrap then creates the user
   namespace as that uid, so the sandbox's uid map names it and never host root.
"""

from __future__ import annotations

import ctypes
import functools
import os
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

import anyio
import anyio.to_thread

from aube.controlplane.runtimes import sandbox
from aube.shared import addresses
from aube.shared.errors import RuntimeFailure

CLONE_NEWNS = 0x00020000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
PROBE_TIMEOUT = 10.0

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def enter_stage(plan: Sequence[tuple[str, str]]) -> None:
    """Make a private mount namespace and bind each (source, staged path) of `plan` into its stage."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # Private first: nothing mounted from here on may propagate back to the host's namespace.
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "making mounts private")
    # Opened before the tmpfs hides them (a source may itself live below STAGE_ROOT); an O_PATH descriptor of
    # this namespace is what the bind below follows.
    fds = [os.open(source, os.O_PATH | os.O_CLOEXEC) for source, _ in plan]
    root = sandbox.STAGE_ROOT.encode()
    _check(_libc.mount(b"aube-stage", root, b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755,size=64k"), "stage tmpfs")
    for fd, (_, staged) in zip(fds, plan, strict=True):
        os.mkdir(staged, 0o755)
        _check(_libc.mount(f"/proc/self/fd/{fd}".encode(), staged.encode(), None, MS_BIND | MS_REC, None), staged)
        os.close(fd)


def drop_privileges(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def memfd(data: bytes) -> int:
    """An inheritable descriptor reading `data` from its start (the seccomp filter, for bubblewrap's --seccomp)."""
    fd = os.memfd_create("aube-seccomp", 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def share_read_only(root: Path) -> None:
    """Owner-only writes, everyone reads: the sandbox's uid reads the function and its requirements, nothing more.

    Owned by root where we are root (a build may have run as another uid, even the instances' own). They are
    bound read-only too; these modes and owners are what holds wherever the instance uid could reach the files.
    """
    privileged = os.geteuid() == 0

    def settle(path: str, mode: int) -> None:
        if privileged:
            os.lchown(path, 0, 0)
        if not os.path.islink(path):  # a link's own mode means nothing (and chmod would follow it)
            os.chmod(path, mode)

    settle(str(root), 0o755)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            settle(os.path.join(folder, name), 0o755)
        for name in files:
            path = os.path.join(folder, name)
            executable = not os.path.islink(path) and os.stat(path).st_mode & 0o111
            settle(path, 0o755 if executable else 0o644)


def make_run_dir(runs: Path, run_dir: Path, owner_ids: tuple[int, int] | None) -> None:
    """The socket folder: reachable through parents only root may search, owned by the instance uid (`owner_ids`,
    where we are root).

    Every sandboxed instance may run as the same uid, so the folder's own mode protects nothing between them: what
    does is that only this instance's sandbox binds it, and nobody but root can walk to it.
    """
    for folder in (runs, run_dir.parent):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if owner_ids is not None:
            os.chmod(folder, 0o700)
    run_dir.mkdir(mode=0o700)
    if owner_ids is not None:
        os.chown(run_dir, *owner_ids)


def lock_run_dir(run_dir: Path, privileged: bool) -> None:
    """Once the instance listens: its folder becomes root's, so the socket can no longer be swapped.

    The platform connects to that path as root and would follow a symbolic link the function put in its place
    (to the Docker socket, say), handing a stream client a root connection: after this the function can change
    nothing in the folder, and what is there must be its socket itself.
    """
    if privileged:
        os.chown(run_dir, 0, 0)
        os.chmod(run_dir, 0o700)
    else:  # the instance runs as our own uid: a mode is all we can set (and it could set it back)
        os.chmod(run_dir, 0o500)
    if not stat.S_ISSOCK(os.lstat(run_dir / sandbox.SOCKET_NAME).st_mode):
        raise RuntimeFailure("the instance's socket folder holds something else than its socket")
    handoff = run_dir / addresses.HANDOFF_SOCKET_NAME  # a proxy connects there as root too
    if os.path.lexists(handoff) and not stat.S_ISSOCK(os.lstat(handoff).st_mode):
        raise RuntimeFailure("the instance's socket folder holds something else than its handoff socket")


async def probe(bwrap: str, seccomp_filter: bytes, drop: tuple[int, int] | None) -> str | None:
    """None when a sandbox like an instance's (its uid, its filter) starts here, else what went wrong."""
    filter_fd = memfd(seccomp_filter)
    try:
        result = await anyio.to_thread.run_sync(_run_probe, sandbox.probe_argv(bwrap, filter_fd), filter_fd, drop)
    except subprocess.TimeoutExpired:
        return f"the probe did not finish within {PROBE_TIMEOUT:g}s"
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    finally:
        os.close(filter_fd)
    if result.returncode != 0:
        return (result.stdout + result.stderr).decode(errors="replace").strip() or f"exit {result.returncode}"
    return None


def _run_probe(argv: list[str], filter_fd: int, drop: tuple[int, int] | None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        pass_fds=(filter_fd,),
        cwd="/",
        preexec_fn=functools.partial(drop_privileges, *drop) if drop else None,
        timeout=PROBE_TIMEOUT,
        check=False,
    )
