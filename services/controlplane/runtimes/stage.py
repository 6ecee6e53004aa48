"""What a sandboxed instance's child does between fork and exec, as root, before it becomes bubblewrap.

1. A private mount namespace with a tmpfs over STAGE_ROOT, and each host folder the sandbox needs bound there
   (`sandbox.stage_plan`): bubblewrap will run as an unprivileged uid that may not walk into those folders
   (a data dir under a 0700 folder, a Python under /root), and a bind of a folder needs no search permission on
   its parents. Nobody else sees these mounts; they go with the namespace when the instance ends.
2. The drop to the instance uid and gid (no supplementary groups), for good: bubblewrap then creates the user
   namespace as that uid, so the sandbox's uid map names it and never host root.

System calls only (through ctypes, loaded at import): this runs in a child forked from a threaded process.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence

from aube.controlplane.runtimes.sandbox import STAGE_ROOT

CLONE_NEWNS = 0x00020000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

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
    stage = STAGE_ROOT.encode()
    _check(_libc.mount(b"aube-stage", stage, b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755,size=64k"), "stage tmpfs")
    for fd, (_, staged) in zip(fds, plan, strict=True):
        os.mkdir(staged, 0o755)
        _check(_libc.mount(f"/proc/self/fd/{fd}".encode(), staged.encode(), None, MS_BIND | MS_REC, None), staged)
        os.close(fd)


def drop_privileges(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
