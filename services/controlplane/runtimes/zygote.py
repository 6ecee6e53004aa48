"""The zygote: a process that has imported the instance server once and forks each new instance from that state.

`python -I -B -m aube.controlplane.runtimes.zygote` is started by the process runtime (`zygotes.py`), one per
function version, as root on the host, with fd 0 a Unix socket to the control plane (SOCK_SEQPACKET: one message
per request) whose first message is the seccomp filter.
It imports the instance server (asyncio, websockets, `aube.instance`: the bulk of a cold start, see bench/NOTES.md)
and nothing of the function: function code is hostile and may only ever run inside an instance's sandbox.

Isolation is the sandbox's, unchanged: the runtime still starts bubblewrap per instance, with every namespace new,
but running a holder (`sandbox.HOLDER`, a shell) instead of Python. A fork of the zygote then joins that sandbox
as `nsenter` would:

    zygote (host root, never runs a request, never imports the function)
    └── fork: joins the instance's cgroups, drops supplementary groups, setns() into the holder's ipc, uts, net,
        cgroup, pid and mount namespaces, then its user namespace; chroot into the holder's root
        └── fork, the first process in the sandbox's pid namespace: new session, drops the capability
            bounding set, takes the instance uid and gid, drops every capability, rlimits, its own stdout, the
            instance's environment, no_new_privs and the same seccomp filter bubblewrap loads; reseeds `random`;
            then imports the function and serves. Once its parent exits the zygote, a child subreaper, adopts
            (and later reaps) it: an orphan goes to a subreaper among its ancestors, never to the init of its
            pid namespace. So it is no descendant of bubblewrap; a stop finds it by its pid namespace
            (`sandbox.namespace_members`).

Each instance is a fresh fork of the pristine zygote, so nothing one instance (or its function) does is seen by
another; the zygote keeps no state of a request. The holder's stdin is a pipe whose only writer is the instance:
when the instance ends, however it ends, the holder reads end of file and exits, and bubblewrap with it.

Request (one datagram on fd 0, JSON; SCM_RIGHTS: the instance's stdout and stderr files, then the holder's pipe end):
    {"target": <holder pid>, "leader": <its bubblewrap>, "env": {...}, "uid": u, "gid": g,
     "rlimits": [[resource, value], ...], "procs": [cgroup.procs paths], "fn_dir": ..., "deps_dir": ...}
Reply: {"pid": <the instance's host pid>} or {"error": "..."}.

Only the standard library and the instance server are imported here.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import json
import os
import random
import resource
import signal
import socket
import sys
from typing import Any

from aube.instance import __main__ as instance_main

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
# The user namespace last: joining it first would take host root's rights over the host's other namespaces away.
NAMESPACES = (
    ("ipc", CLONE_NEWIPC),
    ("uts", CLONE_NEWUTS),
    ("net", CLONE_NEWNET),
    ("cgroup", CLONE_NEWCGROUP),
    ("pid", CLONE_NEWPID),
    ("mnt", CLONE_NEWNS),
    ("user", CLONE_NEWUSER),
)
PR_SET_CHILD_SUBREAPER = 36
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
MAX_REQUEST = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _prctl(option: int, arg: int, what: str) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), what)


def _load_seccomp(program: bytes) -> None:
    """Load a BPF program (libseccomp's export: an array of 8-byte sock_filter) for this process and its children."""
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "no_new_privs")
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "seccomp")


def _enter(target: int, leader: int, procs: list[str]) -> None:
    """In the first fork (host root): the instance's cgroups, then the holder's namespaces and root."""
    for path in procs:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
    os.setgroups([])  # while still host root: inside, bubblewrap's user namespace denies setgroups
    own = {name: os.stat(f"/proc/self/ns/{name}").st_ino for name, _ in NAMESPACES}
    fds = []
    for name, flag in NAMESPACES:
        # Opened before any setns: /proc/<target> must be read from the host's pid and mount namespaces.
        if os.stat(f"/proc/{target}/ns/{name}").st_ino != own[name]:
            fds.append((os.open(f"/proc/{target}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC), flag, name))
    root = os.open(f"/proc/{target}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    # Still bubblewrap's child once its namespaces are open: not a recycled pid of someone else's process.
    with open(f"/proc/{target}/stat") as f:
        if int(f.read().rpartition(")")[2].split()[1]) != leader:
            raise OSError(f"process {target} is no longer the sandbox of bubblewrap {leader}")
    if not any(name == "user" for _, _, name in fds) or not any(name == "pid" for _, _, name in fds):
        raise OSError(f"process {target} is not in a sandbox of its own")
    for fd, flag, name in fds:
        _check(_libc.setns(fd, flag), f"setns({name})")
        os.close(fd)
    os.fchdir(root)
    os.chroot(".")
    os.close(root)


def _become_instance(request: dict[str, Any], out_fd: int, err_fd: int, keep_fd: int, program: bytes) -> None:
    """In the second fork, inside the sandbox: everything bubblewrap does for its command, then the server."""
    os.setsid()
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) != 0:
            break  # EINVAL: past the last capability this kernel knows
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    gid, uid = int(request["gid"]), int(request["uid"])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    # Not cleared by the uid change here: host root is no uid 0 of the sandbox's user namespace (it is unmapped).
    _check(_libc.capset(ctypes.byref(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)), (_CapData * 2)()), "capset")
    _prctl(PR_SET_DUMPABLE, 1, "dumpable")  # as after bubblewrap's exec: the instance may read its own /proc
    for key, value in request["rlimits"]:
        resource.setrlimit(key, (value, value))
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    os.set_inheritable(keep_fd, False)  # programs the function runs do not keep the sandbox alive
    os.closerange(3, keep_fd)
    os.closerange(keep_fd + 1, 65536)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # Python's own default
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(str(request["fn_dir"]))
    # What PYTHONPATH and `-m` from the function folder give a fresh interpreter: its requirements, its folder.
    sys.path[:] = [str(request["deps_dir"]), *(p for p in sys.path if p and p != "/")]
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the process's own stdout
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    random.seed()  # the zygote's state was copied into every fork
    _load_seccomp(program)


def _shadowed(deps_dir: str) -> bool:
    """Does the function's requirements folder hold a top-level module this process has imported already?"""
    try:
        entries = os.listdir(deps_dir)
    except OSError:
        return False
    loaded = {name.partition(".")[0] for name in sys.modules}
    for entry in entries:
        if entry.endswith((".dist-info", ".egg-info", ".pth")) or entry in ("__pycache__", "bin"):
            continue
        if entry.partition(".")[0] in loaded:
            return True
    return False


def _fork_instance(request: dict[str, Any], out_fd: int, err_fd: int, keep_fd: int, program: bytes) -> dict[str, Any]:
    report_r, report_w = os.pipe()
    first = os.fork()
    if first == 0:
        status = 1
        try:
            os.close(report_r)
            _enter(int(request["target"]), int(request["leader"]), list(request["procs"]))
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.close(report_w)
                    _become_instance(request, out_fd, err_fd, keep_fd, program)
                    if _shadowed(str(request["deps_dir"])):
                        # The function brings its own version of a module the server has imported already: only a
                        # fresh interpreter (in this same sandbox) runs it with its own, as without a zygote.
                        os.set_inheritable(keep_fd, True)
                        os.execv(sys.executable, [sys.executable, "-m", "aube.instance"])
                    code = instance_main.main()
                except BaseException as e:
                    os.write(2, f"aube zygote: the instance could not start: {e!r}\n".encode())
                finally:
                    sys.stdout.flush()
                    os._exit(code)
            os.write(report_w, json.dumps({"pid": pid}).encode())
            status = 0
        except BaseException as e:
            os.write(report_w, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
        finally:
            os._exit(status)
    os.close(report_w)
    try:
        data = b""
        while chunk := os.read(report_r, 4096):
            data += chunk
    finally:
        os.close(report_r)
        with contextlib.suppress(ChildProcessError):  # the SIGCHLD handler may have reaped it already
            os.waitpid(first, 0)
    return json.loads(data) if data else {"error": "the fork ended without a report"}


def serve(channel: socket.socket, program: bytes) -> None:
    fds = array.array("i")
    while True:
        data, ancillary, _, _ = channel.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(3 * fds.itemsize))
        if not data:
            # The control plane closed the channel, or exited: a zygote never outlives it. (Not PR_SET_PDEATHSIG:
            # its "parent" is the thread that started it, and the control plane's worker threads come and go.)
            return
        received = array.array("i")
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
        try:
            if len(received) != 3:
                reply: dict[str, Any] = {"error": "a request carries three descriptors"}
            else:
                reply = _fork_instance(json.loads(data), received[0], received[1], received[2], program)
        except (OSError, ValueError, KeyError) as e:
            reply = {"error": f"{type(e).__name__}: {e}"}
        finally:
            for fd in received:
                os.close(fd)
        channel.send(json.dumps(reply).encode())


def _reap(signum: int, frame: object) -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def main() -> int:
    # An instance's parent (the first fork) exits at once, and an orphan goes to the nearest subreaper among its
    # ancestors, not to its pid namespace's init: the zygote adopts its instances and reaps them as they end, or
    # the holder (whose exit waits until every process of its namespace is reaped) could wait forever.
    _prctl(PR_SET_CHILD_SUBREAPER, 1, "subreaper")
    signal.signal(signal.SIGCHLD, _reap)
    channel = socket.socket(fileno=os.dup(0))
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)  # fd 0 again, for the forks' sake
    os.close(null)
    program = channel.recv(MAX_REQUEST)
    serve(channel, program)
    return 0


if __name__ == "__main__":
    sys.exit(main())
