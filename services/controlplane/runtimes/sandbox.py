"""The process runtime's decisions without I/O: the bubblewrap argv, rlimit values, and reading /proc.

Everything here takes text or values and returns values, so it is unit-tested without processes; the
process runtime does the spawning (`launch.py`), signalling and /proc reading (`leaders.py`) around it.

How an instance looks from /proc (what `find_leaders` and `signal_targets` rely on):

    plain:   python -m aube.instance     session leader, environment carries the markers
    bwrap:   bwrap                       session leader, environment carries the markers (AUBE_SANDBOX=bwrap)
             └── python -m aube.instance pid 1 of the sandbox (--as-pid-1), own session, --clearenv: no marker

So an instance is a marked session leader whose parent is not marked itself. (That parent rule also covers
bubblewrap without --as-pid-1, where a clone of the outer bwrap with the same environment and a session of
its own sits between the two.)

Why --as-pid-1: without it bubblewrap's outer process exits as soon as its in-sandbox init reports the exit
status, before reaping that init, which is left to the host's init; where pid 1 reaps nobody (some
containers), every stopped instance would leave a zombie. With it the outer process waits for its one child.
A pid 1 only gets the signals it handles: the in-instance server handles SIGTERM, and SIGKILL always works.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import msgspec

from aube.controlplane.bounds import memory_bytes

# Environment markers on an instance's session leader. Only the process runtime reads them back (after a
# restart of the control plane, to find its instances again); the in-instance server ignores them.
ENV_MANAGED_OWNER = "AUBE_MANAGED_OWNER"
ENV_SLOT = "AUBE_SLOT"
ENV_SANDBOX = "AUBE_SANDBOX"  # "bwrap" or "none": how stop() must signal the tree

# Where the function and its requirements appear inside the sandbox: fixed paths, so a function learns
# nothing about the host's layout (the data dir, the owner).
SANDBOX_FN_DIR = "/aube/fn"
SANDBOX_DEPS_DIR = "/aube/deps"
# The instance's own socket folder (a folder per instance on the host, bound into that sandbox only).
SANDBOX_RUN_DIR = "/aube/run"
SOCKET_NAME = "instance.sock"
# Where the host folders an instance needs are bound, in the private mount namespace its bubblewrap starts in
# (see `stage_plan`): a tmpfs over /tmp there, which nobody else sees.
STAGE_ROOT = "/tmp"

# What Python and TLS need from the host, read-only. The `-try` variant skips what a distribution lacks
# (/lib32, /etc/ca-certificates...), so the argv needs no existence checks.
SYSTEM_RO_PATHS = (
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/resolv.conf",
    "/etc/passwd",
    "/etc/group",
)

SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"

# With a zygote (`zygote.py`) bubblewrap runs this holder as the sandbox's pid 1 and the instance, forked from the
# zygote, joins its namespaces. The holder ignores the stop signals (the instance handles them; a pid 1 gets no
# signal it has no handler for anyway) and lives until its stdin, a pipe only the instance holds, reaches end of
# file: the sandbox ends with the instance, however it ends. "r" on its stdout says the sandbox is set up.
HOLDER = ("/bin/sh", "-c", 'trap "" TERM INT HUP; echo r; read -r _')


def parse_memory(text: str) -> int:
    """Bytes in a memory size, parsed by the upload's own parser (`aube.controlplane.bounds.memory_bytes`)."""
    value = memory_bytes(text)
    if value <= 0:
        raise ValueError(f"memory size must be positive: {text!r}")
    return value


def rlimits(memory: str, max_file: int) -> dict[str, int]:
    """The `resource.RLIMIT_*` names and values applied to an instance (soft = hard).

    RLIMIT_AS bounds address space, not resident memory, so it is a loose stand-in for the manifest's
    `memory` (the runtime also sets MALLOC_ARENA_MAX to keep glibc's per-thread arenas from eating it).
    Not here: `cpus` (no per-process CPU share in rlimits) and `pids` (RLIMIT_NPROC counts every process of the
    user, so it would count the host's processes as well); cgroups.py enforces both where the host allows.
    RLIMIT_FSIZE (`max_file`) bounds the instance's stdout and stderr files (output.py), which it could otherwise
    grow faster than they are read, or ftruncate to a sparse terabyte whose end the reader never reaches: a write
    or ftruncate past it fails with EFBIG (Python ignores SIGXFSZ). It holds for every file the function writes.
    """
    return {"RLIMIT_AS": parse_memory(memory), "RLIMIT_CORE": 0, "RLIMIT_FSIZE": max_file}


def minimal_roots(paths: Iterable[str]) -> list[str]:
    """The paths without duplicates and without those inside another one (a bind of the parent covers them)."""
    ordered = sorted({p.rstrip("/") or "/" for p in paths})
    roots: list[str] = []
    for path in ordered:
        if not any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots):
            roots.append(path)
    return roots


def stage_plan(sources: Iterable[str]) -> list[tuple[str, str]]:
    """Where each host folder is bound in the instance's private stage (STAGE_ROOT/<n>), in order.

    bubblewrap runs as the unprivileged instance uid, which cannot walk into a root-only folder (the data dir,
    a Python under /root); the stage makes each folder reachable by a path of its own, for that one sandbox.
    """
    return [(source, f"{STAGE_ROOT}/{n}") for n, source in enumerate(sources)]


def bwrap_argv(
    bwrap: str,
    *,
    ro_binds: Sequence[tuple[str, str]],
    run_dir: str,
    env: Mapping[str, str],
    command: Sequence[str],
    seccomp_fd: int | None,
) -> list[str]:
    """The bubblewrap command line for one instance.

    `ro_binds` (source, destination): Python's prefixes and Aube's sources at their own paths, the function and
    its requirements at SANDBOX_FN_DIR / SANDBOX_DEPS_DIR; `run_dir`, the instance's socket folder, writable at
    SANDBOX_RUN_DIR. Every namespace is new, the network too: the instance has a loopback of its own and nothing
    else, and is reached through its Unix socket. No --die-with-parent: an instance outlives a crash of the
    control plane, whose reconcile finds it again.
    """
    argv = [
        bwrap,
        "--unshare-all",
        "--unshare-user",  # explicit: --unshare-all only tries, and root outside must not be root inside
        "--unshare-net",
        "--disable-userns",  # no user namespace of its own inside (the seccomp filter refuses unshare too)
        "--new-session",  # no TIOCSTI into a terminal the control plane may have
        "--as-pid-1",  # see the module docstring: no orphaned bwrap init
        "--cap-drop",
        "ALL",
        "--clearenv",
    ]
    for key, value in sorted(env.items()):
        argv += ["--setenv", key, value]
    # Mounts apply in order: the private /tmp, /proc and /dev come first, so that a Python or an Aube checkout
    # living under /tmp (a CI clone, say) is bound on top of the private /tmp rather than hidden by it.
    argv += ["--tmpfs", "/tmp", "--proc", "/proc", "--dev", "/dev"]
    for path in SYSTEM_RO_PATHS:
        argv += ["--ro-bind-try", path, path]
    for source, destination in ro_binds:
        argv += ["--ro-bind", source, destination]
    argv += ["--bind", run_dir, SANDBOX_RUN_DIR, "--chdir", SANDBOX_FN_DIR]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    return [*argv, *command]


def probe_argv(bwrap: str, seccomp_fd: int | None = None) -> list[str]:
    """A sandbox with the same namespaces as an instance's, running `true`: does bubblewrap work here?"""
    argv = [
        bwrap, "--unshare-all", "--unshare-user", "--unshare-net", "--disable-userns", "--new-session", "--as-pid-1",
        "--cap-drop", "ALL", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev",
    ]  # fmt: skip
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    return [*argv, "true"]


# ---------------------------------------------------------------------------------------------------------
# /proc


class ProcStat(msgspec.Struct, frozen=True, kw_only=True):
    pid: int
    state: str
    ppid: int
    pgrp: int
    session: int
    starttime: int  # clock ticks after boot: with the pid, it names one process for its whole life


class ProcInfo(msgspec.Struct, frozen=True, kw_only=True):
    stat: ProcStat
    environ: dict[str, str]


class Leader(msgspec.Struct, frozen=True, kw_only=True):
    """An instance's session leader, as found in /proc."""

    handle: str
    environ: dict[str, str]
    alive: bool


def parse_stat(text: str) -> ProcStat:
    """Parse /proc/<pid>/stat. The command name is in parentheses and may itself hold spaces or ')'."""
    head, _, rest = text.rpartition(")")
    pid = int(head.split("(", 1)[0])
    fields = rest.split()
    # fields[0] is field 3 of proc(5) (state); starttime is field 22.
    return ProcStat(
        pid=pid,
        state=fields[0],
        ppid=int(fields[1]),
        pgrp=int(fields[2]),
        session=int(fields[3]),
        starttime=int(fields[19]),
    )


def parse_environ(data: bytes) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def format_handle(pid: int, starttime: int) -> str:
    return f"{pid}:{starttime}"


def parse_handle(handle: str) -> tuple[int, int]:
    """(pid, starttime) of a handle from `format_handle`; ValueError for anything else."""
    pid, starttime = handle.split(":")
    return int(pid), int(starttime)


def is_gone(stat: ProcStat | None, starttime: int) -> bool:
    """True when the process a handle names no longer runs: no such pid, a newer process, or a zombie."""
    return stat is None or stat.starttime != starttime or stat.state in ("Z", "X", "x")


def find_leaders(procs: Iterable[ProcInfo], owner: str) -> list[Leader]:
    """The instances of `owner`: marked session leaders whose parent is not a marked leader (see module doc)."""
    marked = {
        p.stat.pid: p for p in procs if p.stat.session == p.stat.pid and p.environ.get(ENV_MANAGED_OWNER) == owner
    }
    return [
        Leader(
            handle=format_handle(p.stat.pid, p.stat.starttime),
            environ=p.environ,
            alive=not is_gone(p.stat, p.stat.starttime),
        )
        for pid, p in sorted(marked.items())
        if p.stat.ppid not in marked
    ]


def descendants(stats: Iterable[ProcStat], root: int) -> list[ProcStat]:
    """Every process below `root`, by parent pid, parents before children."""
    children: dict[int, list[ProcStat]] = {}
    for s in stats:
        children.setdefault(s.ppid, []).append(s)
    found: list[ProcStat] = []
    queue = [root]
    while queue:
        for child in sorted(children.get(queue.pop(0), []), key=lambda s: s.pid):
            found.append(child)
            queue.append(child.pid)
    return found


def signal_targets(stats: Iterable[ProcStat], leader: int, *, sandboxed: bool) -> list[int]:
    """Whom a stop signals: the leader and everything below it, but in a sandbox not the bubblewrap processes.

    Bubblewrap's outer process dies at once on SIGTERM, which would orphan the sandbox. Signalling the
    workload instead lets the chain unwind by itself: the server exits, then bwrap, having reaped it. With
    SIGKILL the sandbox's pid 1 dies and the kernel kills the rest of its pid namespace.
    """
    below = descendants(stats, leader)
    if not sandboxed:
        return [leader, *(s.pid for s in below)]
    return [s.pid for s in below]


def namespace_members(namespaces: Mapping[int, str], targets: Sequence[int], own: str) -> list[int]:
    """The processes that share a pid namespace other than `own` (the host's) with one of `targets` (a sandbox's),
    the targets left out; `namespaces` maps each pid to its pid namespace."""
    wanted = {namespaces[t] for t in targets if t in namespaces} - {own}
    chosen = set(targets)
    return sorted(pid for pid, ns in namespaces.items() if ns in wanted and pid not in chosen)


def listening_ports(proc_net_tcp: str) -> set[int]:
    """Ports in LISTEN state in the text of /proc/net/tcp (or tcp6)."""
    ports: set[int] = set()
    for line in proc_net_tcp.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A":
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
