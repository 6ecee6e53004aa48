"""How the process runtime starts one instance's leader: its argv and environment, the spawn, and its announcement.

Apart from the runtime (`process.py`, which decides when to start what and holds the state around it) because this
is the part that knows the shape of a launch: the markers that let a later listing find the leader in /proc
(`command`), the host paths the sandboxed interpreter needs (`python_paths`), what the child does between fork and
exec (`_prepare_child`: limits, cgroups, then `stage.py`'s stage and drop), and reading the address the instance
prints once it listens (`wait_listening`). bubblewrap's argv itself is decided, without I/O, in `sandbox.py`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import anyio.to_thread

from aube.controlplane.runtimes import cgroups, sandbox, stage
from aube.controlplane.runtimes.base import InstanceSpec, instance_environment
from aube.controlplane.runtimes.leaders import CHILDREN, read_stat
from aube.instance.config import LISTENING_MARKER
from aube.shared import addresses, names
from aube.shared.errors import HealthCheckFailed, RuntimeFailure

INSTANCE_HOST = "127.0.0.1"
# Packages the in-instance server imports from Aube's own sources (bound read-only into the sandbox).
INSTANCE_PACKAGES = ("aube.instance", "aube.shared")


def spawn(
    argv: list[str],
    env: dict[str, str],
    cwd: Path,
    out_dir: Path,
    limits: dict[str, int],
    procs: list[str],
    plan: list[tuple[str, str]] | None,
    filter_fd: int | None,
    drop: tuple[int, int] | None,
    stdio: tuple[int, int] | None = None,
) -> str:
    """Start the instance's leader and return its handle; `plan` (sandboxed only): the folders to stage for
    bubblewrap; `drop` (sandboxed by a root control plane): the uid and gid the child takes before it execs bwrap;
    `stdio` (a zygote's holder): its stdin and stdout instead of /dev/null and the output file. Its stdout and stderr
    are appended to the files of `out_dir` (output.py reads them for `aube logs`)."""
    rlimits = [(getattr(resource, key), value) for key, value in limits.items()]
    sandboxed = plan is not None
    try:
        with (out_dir / "stdout").open("ab") as out, (out_dir / "stderr").open("ab") as err:
            # preexec_fn: the limits must hold from the first instruction of the (sandboxed) server on, and
            # the child joins its cgroups while still root; the helpers only make system calls, which is
            # what is safe in a child forked from threads.
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd="/" if sandboxed else cwd,
                stdin=subprocess.DEVNULL if stdio is None else stdio[0],
                stdout=out if stdio is None else stdio[1],
                stderr=err,
                start_new_session=True,
                close_fds=True,
                pass_fds=() if filter_fd is None else (filter_fd,),
                preexec_fn=functools.partial(_prepare_child, rlimits, procs, plan if drop else None, drop),
            )
    except (OSError, subprocess.SubprocessError) as e:  # SubprocessError: the preexec_fn failed
        remove_output(out_dir)
        raise RuntimeFailure(f"could not start {argv[0]}: {e}") from e
    CHILDREN[proc.pid] = proc
    # A child that already exited is still our zombie, so its stat is there until we reap it.
    stat = read_stat(proc.pid)
    if stat is None:
        raise RuntimeFailure(f"/proc/{proc.pid}/stat is unreadable: is /proc mounted?")
    return sandbox.format_handle(proc.pid, stat.starttime)


async def wait_listening(handle: str, out_dir: Path, timeout: float, interval: float = 0.02) -> str:
    """Where the instance announced it listens; RuntimeFailure with its output if it exits first."""
    pid, _ = sandbox.parse_handle(handle)
    proc = CHILDREN.get(pid)
    if proc is None:  # it exited at once and a listing or an exit watch reaped it already
        tail = _tail(out_dir)
        remove_output(out_dir)
        raise RuntimeFailure(f"instance exited at start:\n{tail}")
    with anyio.move_on_after(timeout):
        while True:
            announced = await anyio.to_thread.run_sync(_announced, out_dir / "stdout")
            if announced is not None:
                return announced
            if proc.poll() is not None:
                CHILDREN.pop(pid, None)
                tail = _tail(out_dir)
                remove_output(out_dir)
                raise RuntimeFailure(f"instance exited at start (status {proc.returncode}):\n{tail}")
            # Every 20 ms (5 ms after a fork): this wait is the floor of a process cold start.
            await anyio.sleep(interval)
    tail = _tail(out_dir)
    raise HealthCheckFailed(f"instance did not listen within {timeout:g}s:\n{tail}")


def loopback_address(announced: str) -> str:
    try:
        target = addresses.parse(announced)
    except ValueError as e:
        raise RuntimeFailure(f"the instance announced an address that is not one: {announced[:80]!r}") from e
    if not isinstance(target, addresses.TcpAddress):
        raise RuntimeFailure("an unsandboxed instance announced a Unix socket")
    return f"{INSTANCE_HOST}:{target.port}"


def remove_output(out_dir: Path) -> None:
    shutil.rmtree(out_dir, ignore_errors=True)


def _announced(log_path: Path) -> str | None:
    """What follows the instance's LISTENING_MARKER ("host:port" or "unix:path"), once it has printed it."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(LISTENING_MARKER) and line.rsplit(":", 1)[-1].strip():
            return line[len(LISTENING_MARKER) :].strip()
    return None


def _tail(out_dir: Path, lines: int = 20, limit: int = 8192) -> str:
    """The end of what the instance wrote: its stdout's, then its stderr's (a traceback)."""
    parts = [_tail_of(out_dir / stream, lines, limit) for stream in ("stdout", "stderr")]
    return "\n".join(part for part in parts if part)


def _tail_of(path: Path, lines: int, limit: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").strip().splitlines()[-lines:])


def _prepare_child(
    limits: list[tuple[int, int]],
    procs_files: list[str],
    plan: list[tuple[str, str]] | None,
    drop: tuple[int, int] | None,
) -> None:
    """Between fork and exec: limits, cgroups (as root), then the stage and the drop to the instance uid."""
    for key, value in limits:
        resource.setrlimit(key, (value, value))
    cgroups.join(procs_files)
    if plan is not None:
        stage.enter_stage(plan)
    if drop is not None:
        stage.drop_privileges(*drop)


def python_paths() -> list[str]:
    """What the sandboxed interpreter needs of the host: its prefixes and Aube's (editable) sources."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.add(str(Path(sys.executable).resolve().parent.parent))
    for package in INSTANCE_PACKAGES:
        spec = importlib.util.find_spec(package)
        for location in (spec.submodule_search_locations or []) if spec else []:
            paths.add(str(Path(location).resolve()))
    return sandbox.minimal_roots(paths)


def command(
    spec: InstanceSpec,
    bwrap: str | None,
    fn_dir: Path,
    deps_dir: Path,
    staged: list[tuple[str, str]] | None,
    run_dir: Path,
    seccomp_fd: int | None,
    holder: bool = False,
) -> tuple[list[str], dict[str, str]]:
    """The argv and the environment of an instance's session leader.

    `staged` (a root control plane): where `sandbox.stage_plan` put each folder the sandbox binds; without it
    bubblewrap binds the host paths themselves. `holder`: the sandbox runs `sandbox.HOLDER`, and the instance is
    forked into it from a zygote (with `inner_environment` as its environment).
    """
    server = list(sandbox.HOLDER) if holder else [sys.executable, "-m", "aube.instance"]
    inner = inner_environment(spec, bwrap, fn_dir, deps_dir)
    markers = {
        sandbox.ENV_MANAGED_OWNER: spec.owner,
        sandbox.ENV_SANDBOX: "bwrap" if bwrap else "none",
        names.ENV_INSTANCE_ID: spec.instance_id,
        names.ENV_FUNCTION: spec.function,
        names.ENV_VERSION: str(spec.version),
        sandbox.ENV_SLOT: str(spec.slot),
    }
    if bwrap is None:
        return server, {**inner, **markers}
    python = python_paths()
    where = dict(staged) if staged is not None else {}
    ro_binds = [(where.get(path, path), path) for path in python]
    ro_binds += [
        (where.get(str(fn_dir), str(fn_dir)), sandbox.SANDBOX_FN_DIR),
        (where.get(str(deps_dir), str(deps_dir)), sandbox.SANDBOX_DEPS_DIR),
    ]
    argv = sandbox.bwrap_argv(
        bwrap,
        ro_binds=ro_binds,
        run_dir=where.get(str(run_dir), str(run_dir)),
        env=inner,
        command=server,
        seccomp_fd=seccomp_fd,
    )
    # The owner marker stays outside the sandbox: inside, only the outer bwrap carries it (see sandbox.py).
    return argv, {**markers, "PATH": sandbox.SANDBOX_PATH}


def inner_environment(spec: InstanceSpec, bwrap: str | None, fn_dir: Path, deps_dir: Path) -> dict[str, str]:
    """The in-instance server's environment (no marker of the runtime's)."""
    inner = instance_environment(spec, 0)
    inner.setdefault("MALLOC_ARENA_MAX", "2")  # glibc reserves 64 MiB of address space per thread arena
    inner.update({sandbox.ENV_SLOT: str(spec.slot), "PATH": sandbox.SANDBOX_PATH, "HOME": "/tmp", "LANG": "C.UTF-8"})
    if bwrap is None:
        inner.update({"AUBE_INSTANCE_HOST": INSTANCE_HOST, "AUBE_FN_DIR": str(fn_dir), "PYTHONPATH": str(deps_dir)})
        return inner
    inner.update(
        {
            "AUBE_INSTANCE_SOCKET": f"{sandbox.SANDBOX_RUN_DIR}/{sandbox.SOCKET_NAME}",
            # Beside it, where a proxy of this host hands over clients' own sockets (aube.instance.handoff).
            "AUBE_INSTANCE_HANDOFF": f"{sandbox.SANDBOX_RUN_DIR}/{addresses.HANDOFF_SOCKET_NAME}",
            "AUBE_FN_DIR": sandbox.SANDBOX_FN_DIR,
            "PYTHONPATH": sandbox.SANDBOX_DEPS_DIR,
        }
    )
    return inner
