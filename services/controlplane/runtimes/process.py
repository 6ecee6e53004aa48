"""The embedded runtime for machines without Docker: one child process per instance, in bubblewrap if it works.

An instance is `python -m aube.instance` (the same server as in a container) on a free loopback port, with
the function's requirements on its PYTHONPATH, in a session of its own so that it outlives a crash of the
control plane. Its session leader carries environment markers (owner, function, version, slot, instance id),
which is how `instances()` finds it again in /proc after a restart. A handle is "<pid>:<starttime>": the start
time from /proc/<pid>/stat tells a recycled pid from ours.

Isolation (`settings.sandbox`): "auto" uses bubblewrap when `bwrap` is on PATH and a probe sandbox starts,
"bwrap" insists on it, "none" runs plain processes on a loopback port. In the sandbox every namespace is new,
the network too (no network at all: the instance listens on a Unix socket in a folder of its own, see
`_run_dir`), the host is visible read-only and only where Python needs it, /tmp is a private tmpfs, a seccomp
filter (`seccomp.py`) refuses what a function needs none of, and the instance runs as the unprivileged
`sandbox_uid` (the child stages its folders and drops to that uid before it becomes bubblewrap: `stage.py`).
Limits: RLIMIT_AS from the manifest's `memory` and no core dumps, always (`sandbox.rlimits`); `cpus`, `pids`
and resident `memory` through cgroups where the host lets this process write them (`cgroups.py`), which the log
says at the first start.

Exits are noticed through a pidfd per instance leader (`watch_exits`): the event loop reads it, and it becomes
readable the moment the leader ends, whether this process started it or adopted it after a restart (a pidfd does
not need the process to be a child). The leader is bubblewrap's outer process in the sandbox, which ends with the
instance inside it.

Layout under `data_dir`:
    functions/<owner>/<name>/v<version>/fn      the function folder (the artifact is the version folder)
    functions/<owner>/<name>/v<version>/deps    its requirements, installed from wheels
    cache/                                      pip's cache and installed requirement sets (see deps.py)
    logs/<owner>/<function>-<instance id>.log   an instance's stdout and stderr; removed when it is stopped
and under `socket_dir` (/run/aube for root: a Unix socket path holds 107 bytes, a data dir path often more):
    <owner>/<instance id>/instance.sock         a sandboxed instance's socket (see `stage.make_run_dir`)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import anyio
import anyio.to_thread

from aube.controlplane.runtimes import cgroups, deps, sandbox, seccomp, stage
from aube.controlplane.runtimes.base import (
    Artifact,
    BuildLog,
    ExitListener,
    InstanceSpec,
    RunningInstance,
    StartedInstance,
    instance_environment,
)
from aube.instance.config import LISTENING_MARKER
from aube.shared import addresses, names
from aube.shared.errors import BuildFailed, HealthCheckFailed, RuntimeFailure
from aube.shared.schemas import Manifest, RuntimeKind
from aube.shared.settings import ControlPlaneSettings

logger = logging.getLogger(__name__)

INSTANCE_HOST = "127.0.0.1"
# Seconds a stopped instance gets between SIGTERM and SIGKILL, and then to go after SIGKILL.
STOP_GRACE = 3.0
# sun_path holds 108 bytes with the terminating NUL.
MAX_SOCKET_PATH = 107
KILL_WAIT = 2.0
# Packages the in-instance server imports from Aube's own sources (bound read-only into the sandbox).
INSTANCE_PACKAGES = ("aube.instance", "aube.shared")
_OWNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Our children, by pid. They belong to this OS process rather than to one ProcessRuntime: a runtime that is
# closed and made anew (as after a reconnect) must still reap the instances the first one started, and a
# Popen dropped while its child runs would warn.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class ProcessRuntime:
    kind: RuntimeKind = "process"

    def __init__(self, settings: ControlPlaneSettings) -> None:
        self._settings = settings
        self._data = Path(settings.data_dir).absolute()
        self._functions = self._data / "functions"
        self._bwrap: str | None = None
        self._sandbox_decided = False
        self._cgroups: cgroups.CgroupLimits | None = None
        self._cgroups_decided = False
        self._starting: set[str] = set()  # instance ids from their socket folder's creation to their spawn
        # Spawned since the oldest listing still running began: its scan of the processes may have missed them, so
        # their groups and socket folders are not leftovers yet (see `instances`).
        self._fresh: set[str] = set()
        # Root stages the sandbox and drops to sandbox_uid; an unprivileged control plane's bubblewrap maps its
        # own uid, which is not root either.
        self._privileged = os.geteuid() == 0
        self._seccomp: bytes = b""
        default_runs = Path("/run/aube") if self._privileged else self._data / "run"
        self._runs = Path(settings.socket_dir).absolute() if settings.socket_dir else default_runs
        self._exit_watches: dict[str, _ExitWatch] = {}  # by owner, while `watch_exits` runs

    # -----------------------------------------------------------------------------------------------------
    # Artifacts

    async def prepare(
        self, name: str, version: int, bundle_dir: Path, manifest: Manifest, owner: str, log: BuildLog
    ) -> str:
        names.validate_name(name)
        _check_owner(owner)
        try:
            sandbox.parse_memory(manifest.limits.memory)
        except ValueError as e:
            raise BuildFailed(f"limits.memory: {e}") from e
        final = self._functions / owner / name / f"v{version}"
        # Built aside and renamed into place: a failed or cancelled prepare leaves no half version behind.
        staging = final.with_name(f"{final.name}.partial-{uuid.uuid4().hex[:8]}")
        try:
            try:
                await anyio.to_thread.run_sync(_copy_function, bundle_dir, staging / "fn")
            except OSError as e:
                raise BuildFailed(f"could not copy the function folder: {e}") from e
            await deps.install_requirements(
                staging / "fn" / "requirements.txt",
                staging / "deps",
                self._data / "cache",
                log,
                self._settings.build_timeout,
            )
            try:
                await anyio.to_thread.run_sync(_publish, staging, final)
            except OSError as e:
                raise BuildFailed(f"could not store the prepared version: {e}") from e
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log(f"prepared {name} v{version} in {final}")
        return str(final)

    async def artifacts(self, owner: str) -> list[Artifact]:
        _check_owner(owner)
        return await anyio.to_thread.run_sync(_list_artifacts, self._functions / owner)

    async def remove_artifact(self, ref: str) -> None:
        await anyio.to_thread.run_sync(_remove_version, self._functions, ref)

    # -----------------------------------------------------------------------------------------------------
    # Instances

    async def start(self, spec: InstanceSpec) -> StartedInstance:
        _check_owner(spec.owner)
        version_dir = Path(spec.artifact)
        fn_dir, deps_dir = version_dir / "fn", version_dir / "deps"
        if not fn_dir.is_dir():
            raise RuntimeFailure(f"artifact {spec.artifact!r} has no function folder (was it removed?)")
        try:
            limits = sandbox.rlimits(spec.manifest.limits.memory)
        except ValueError as e:
            raise RuntimeFailure(f"limits.memory: {e}") from e
        bwrap = await self._sandbox()
        log_path = self._log_path(spec.owner, spec.function, spec.instance_id)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        run_dir = self._run_dir(spec.owner, spec.instance_id)
        # Port 0 (unsandboxed): the instance binds any free port and announces it; a port chosen here could be
        # handed to two instances starting at once (or taken by anyone before the bind), and then one instance
        # would answer for both registry entries. Sandboxed: its own socket folder, made here.
        plan: list[tuple[str, str]] = []
        socket_path = str(run_dir / sandbox.SOCKET_NAME)
        if bwrap is not None and len(socket_path.encode()) > MAX_SOCKET_PATH:
            raise RuntimeFailure(f"socket_dir is too long for a Unix socket path ({MAX_SOCKET_PATH} bytes at most)")
        # From here until the spawn, a listing must not take this instance's folder or groups for leftovers.
        self._starting.add(spec.instance_id)
        filter_fd: int | None = None
        try:
            if bwrap is not None:
                await anyio.to_thread.run_sync(
                    stage.make_run_dir, self._runs, run_dir, self._uid() if self._privileged else None
                )
                plan = sandbox.stage_plan([*_python_paths(), str(fn_dir), str(deps_dir), str(run_dir)])
            # The filter reaches bubblewrap as the inherited descriptor its --seccomp argument names.
            filter_fd = stage.memfd(self._seccomp) if bwrap is not None else None
            log_path.write_bytes(b"")
            staged = plan if self._privileged else None
            argv, env = _command(spec, bwrap, fn_dir, deps_dir, staged, run_dir, filter_fd)
            procs = await self._create_groups(spec, limits["RLIMIT_AS"])
            try:
                handle = self._spawn(argv, env, fn_dir, log_path, limits, procs, plan if bwrap else None, filter_fd)
            except BaseException:
                await self._remove_groups(spec.owner, spec.instance_id)
                _remove_tree(run_dir)
                raise
            if (watch := self._exit_watches.get(spec.owner)) is not None:
                watch.add(handle)
        finally:
            self._fresh.add(spec.instance_id)
            self._starting.discard(spec.instance_id)
            if filter_fd is not None:
                os.close(filter_fd)
        try:
            announced = await self._wait_listening(handle, log_path)
            if bwrap is not None:
                await anyio.to_thread.run_sync(stage.lock_run_dir, run_dir, self._privileged)
                address = addresses.unix(socket_path)
            else:
                address = _loopback_address(announced)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.stop(handle)
            raise
        logger.info(
            "started %s v%d slot %d instance %s as %s at %s (sandbox %s)",
            spec.function, spec.version, spec.slot, spec.instance_id, handle, address, "bwrap" if bwrap else "none",
        )  # fmt: skip
        return StartedInstance(instance_id=spec.instance_id, handle=handle, address=address)

    async def stop(self, handle: str) -> None:
        try:
            pid, starttime = sandbox.parse_handle(handle)
        except ValueError as e:
            raise RuntimeFailure(f"not a process handle: {handle!r}") from e
        info = await anyio.to_thread.run_sync(_read_info, pid)
        if info is None or sandbox.is_gone(info.stat, starttime):
            _reap(pid, starttime)
            return
        sandboxed = info.environ.get(sandbox.ENV_SANDBOX) == "bwrap"
        await anyio.to_thread.run_sync(_signal_instance, pid, starttime, signal.SIGTERM, sandboxed)
        if not await self._wait_gone(pid, starttime, STOP_GRACE):
            logger.info("instance %s did not end within %gs of SIGTERM: SIGKILL", handle, STOP_GRACE)
            await anyio.to_thread.run_sync(_signal_instance, pid, starttime, signal.SIGKILL, sandboxed)
            if not await self._wait_gone(pid, starttime, KILL_WAIT):
                # Only bubblewrap's outer process can be left: its sandbox is gone, so it has nothing to wait for.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                await self._wait_gone(pid, starttime, KILL_WAIT)
        if not sandboxed:
            # Whatever the function started and left in the instance's process group goes with it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        await anyio.to_thread.run_sync(_reap, pid, starttime, KILL_WAIT)
        owner = info.environ.get(sandbox.ENV_MANAGED_OWNER, "")
        function = info.environ.get(names.ENV_FUNCTION, "")
        instance_id = info.environ.get(names.ENV_INSTANCE_ID, "")
        if owner and function and instance_id and _OWNER.match(owner):
            _remove_quietly(self._log_path(owner, function, instance_id))
            _remove_tree(self._run_dir(owner, instance_id))
            await self._remove_groups(owner, instance_id)
        logger.info("stopped instance %s", handle)

    async def is_alive(self, handle: str) -> bool:
        try:
            pid, starttime = sandbox.parse_handle(handle)
        except ValueError:
            return False
        info = await anyio.to_thread.run_sync(_read_info, pid)
        gone = info is None or sandbox.is_gone(info.stat, starttime)
        if gone:
            _reap(pid, starttime)
        return not gone

    def covers(self, host: str) -> bool:
        return not host  # this machine's instances only

    async def instances(self, owner: str) -> list[RunningInstance]:
        # An instance spawned after the scan below began is not in it: `_fresh` keeps it from being taken for a
        # leftover, until a listing that began after its spawn (which therefore saw it) is done.
        fresh_before = set(self._fresh)
        _reap_all()
        procs = await anyio.to_thread.run_sync(_scan_leaders)
        leaders = sandbox.find_leaders(procs, owner)
        found: list[RunningInstance] = []
        for leader in leaders:
            env = leader.environ
            try:
                found.append(
                    RunningInstance(
                        handle=leader.handle,
                        instance_id=env[names.ENV_INSTANCE_ID],
                        function=env[names.ENV_FUNCTION],
                        version=int(env[names.ENV_VERSION]),
                        slot=int(env[sandbox.ENV_SLOT]),
                        alive=leader.alive,
                    )
                )
            except (KeyError, ValueError):
                # Marked as ours but not by this runtime's start(): report nothing rather than guess.
                logger.warning("process %s carries owner %r but incomplete markers", leader.handle, owner)
        # Groups whose instance is gone (stopped while this control plane was down, or killed): remove them.
        # `_starting` ones have no process yet; removing their (empty) groups would fail their start.
        keep = {leader.environ.get(names.ENV_INSTANCE_ID, "") for leader in leaders}
        groups = await self._groups()
        if groups is not None:
            for instance_id in groups.instance_ids(owner) - keep - self._starting - self._fresh:
                await self._remove_groups(owner, instance_id, wait=0)
        # Socket folders likewise; `_starting` ones belong to instances not spawned yet. (Removing a starting
        # instance's folder made bubblewrap fail its bind: "Can't bind mount ... No such file or directory".)
        for instance_id in _folder_names(self._runs / owner) - keep - self._starting - self._fresh:
            _remove_tree(self._run_dir(owner, instance_id))
        self._fresh -= fresh_before
        return found

    async def watch_exits(self, owner: str, exited: ExitListener) -> None:
        _check_owner(owner)
        if owner in self._exit_watches:
            raise RuntimeFailure(f"the exits of {owner}'s instances are watched already")
        watch = _ExitWatch(asyncio.get_running_loop(), exited)
        # Registered before the listing: an instance started meanwhile is added by `start` or found by the listing
        # (twice is harmless, `add` keeps one pidfd per handle).
        self._exit_watches[owner] = watch
        try:
            for instance in await self.instances(owner):
                watch.add(instance.handle)
            await anyio.sleep_forever()
        finally:
            del self._exit_watches[owner]
            watch.close()

    async def close(self) -> None:
        # Instances outlive the runtime object (the control plane stops them); only reap what has ended.
        _reap_all()

    # -----------------------------------------------------------------------------------------------------

    async def _sandbox(self) -> str | None:
        """bwrap's path when instances run in bubblewrap, else None; decided once, on the first start."""
        if self._sandbox_decided:
            return self._bwrap
        mode = self._settings.sandbox
        bwrap = shutil.which("bwrap") if mode != "none" else None
        if mode == "bwrap" and bwrap is None:
            raise RuntimeFailure("sandbox 'bwrap' is configured but bwrap is not on PATH")
        if bwrap is not None:
            try:
                self._seccomp = await anyio.to_thread.run_sync(seccomp.compile_bpf)
            except (OSError, RuntimeError, ImportError, AttributeError) as e:  # AttributeError: no libseccomp
                raise RuntimeFailure(f"could not build the sandbox's seccomp filter: {e}") from e
            problem = await stage.probe(bwrap, self._seccomp, self._uid() if self._privileged else None)
            if problem is not None:
                if mode == "bwrap":
                    raise RuntimeFailure(f"sandbox 'bwrap' is configured but bubblewrap fails here: {problem}")
                logger.warning("bubblewrap fails here, instances run without a sandbox: %s", problem)
                bwrap = None
        logger.info("process runtime: instances run %s", f"in bubblewrap ({bwrap})" if bwrap else "unsandboxed")
        self._bwrap, self._sandbox_decided = bwrap, True
        return bwrap

    async def _create_groups(self, spec: InstanceSpec, memory_bytes: int) -> list[str]:
        """The instance's cgroups, limits written; their `cgroup.procs` files ([] where cgroups are unusable)."""
        groups = await self._groups()
        if groups is None:
            return []
        values = cgroups.settings_for(spec.manifest.limits, memory_bytes)
        try:
            return await anyio.to_thread.run_sync(groups.create, spec.owner, spec.instance_id, values)
        except OSError as e:
            raise RuntimeFailure(f"could not set the cgroup limits of instance {spec.instance_id}: {e}") from e

    async def _groups(self) -> cgroups.CgroupLimits | None:
        """This host's usable cgroups, decided once (a runtime that only stops instances needs them too)."""
        if not self._cgroups_decided:
            self._cgroups, how = await anyio.to_thread.run_sync(cgroups.CgroupLimits.detect)
            self._cgroups_decided = True
            if self._cgroups is None:
                logger.warning("process runtime: cpus and pids limits are not enforced: %s", how)
            else:
                logger.info("process runtime: cpus, pids and memory limits through %s", how)
        return self._cgroups

    async def _remove_groups(self, owner: str, instance_id: str, wait: float = 2.0) -> None:
        groups = await self._groups()
        if groups is not None and not await anyio.to_thread.run_sync(
            functools.partial(groups.remove, owner, instance_id, wait=wait)
        ):
            # An unreaped zombie keeps a group busy; the next listing tries again, quietly (wait=0).
            level = logging.WARNING if wait else logging.DEBUG
            logger.log(level, "cgroups of instance %s still hold a process: left for a later pass", instance_id)

    def _spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: Path,
        log_path: Path,
        limits: dict[str, int],
        procs: list[str],
        plan: list[tuple[str, str]] | None,
        filter_fd: int | None,
    ) -> str:
        """Start the instance's leader; `plan` (sandboxed only): the folders to stage for bubblewrap."""
        rlimits = [(getattr(resource, key), value) for key, value in limits.items()]
        sandboxed = plan is not None
        drop = self._uid() if sandboxed and self._privileged else None
        try:
            with log_path.open("ab") as out:
                # preexec_fn: the limits must hold from the first instruction of the (sandboxed) server on, and
                # the child joins its cgroups while still root; the helpers only make system calls, which is
                # what is safe in a child forked from threads.
                proc = subprocess.Popen(
                    argv,
                    env=env,
                    cwd="/" if sandboxed else cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=() if filter_fd is None else (filter_fd,),
                    preexec_fn=functools.partial(_prepare_child, rlimits, procs, plan if drop else None, drop),
                )
        except (OSError, subprocess.SubprocessError) as e:  # SubprocessError: the preexec_fn failed
            _remove_quietly(log_path)
            raise RuntimeFailure(f"could not start {argv[0]}: {e}") from e
        _CHILDREN[proc.pid] = proc
        # A child that already exited is still our zombie, so its stat is there until we reap it.
        stat = _read_stat(proc.pid)
        if stat is None:
            raise RuntimeFailure(f"/proc/{proc.pid}/stat is unreadable: is /proc mounted?")
        return sandbox.format_handle(proc.pid, stat.starttime)

    async def _wait_listening(self, handle: str, log_path: Path) -> str:
        """Where the instance announced it listens; RuntimeFailure with its output if it exits first."""
        pid, _ = sandbox.parse_handle(handle)
        proc = _CHILDREN[pid]
        with anyio.move_on_after(self._settings.health_timeout):
            while True:
                announced = await anyio.to_thread.run_sync(_announced, log_path)
                if announced is not None:
                    return announced
                if proc.poll() is not None:
                    _CHILDREN.pop(pid, None)
                    tail = _tail(log_path)
                    _remove_quietly(log_path)
                    raise RuntimeFailure(f"instance exited at start (status {proc.returncode}):\n{tail}")
                # Every 20 ms: this wait is the floor of a process cold start.
                await anyio.sleep(0.02)
        tail = _tail(log_path)
        raise HealthCheckFailed(f"instance did not listen within {self._settings.health_timeout:g}s:\n{tail}")

    async def _wait_gone(self, pid: int, starttime: int, timeout: float) -> bool:
        with anyio.move_on_after(timeout):
            while True:
                _reap(pid, starttime)
                if sandbox.is_gone(_read_stat(pid), starttime):
                    return True
                await anyio.sleep(0.05)
        return False

    def _log_path(self, owner: str, function: str, instance_id: str) -> Path:
        return self._data / "logs" / owner / f"{function}-{instance_id}.log"

    def _run_dir(self, owner: str, instance_id: str) -> Path:
        return self._runs / owner / instance_id

    def _uid(self) -> tuple[int, int]:
        uid = self._settings.sandbox_uid
        return (uid, uid) if self._privileged else (os.getuid(), os.getgid())


class _ExitWatch:
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
        if sandbox.is_gone(_read_stat(pid), starttime):
            os.close(fd)
            self._loop.call_soon(self._exited, handle)
            return
        self._fds[handle] = fd
        self._loop.add_reader(fd, self._ended, handle)

    def _ended(self, handle: str) -> None:
        self._forget(handle)
        pid, starttime = sandbox.parse_handle(handle)
        _reap(pid, starttime)  # our child: collect its status now rather than leave a zombie until the next pass
        self._exited(handle)

    def _forget(self, handle: str) -> None:
        fd = self._fds.pop(handle, None)
        if fd is not None:
            self._loop.remove_reader(fd)
            os.close(fd)

    def close(self) -> None:
        for handle in list(self._fds):
            self._forget(handle)


# ---------------------------------------------------------------------------------------------------------
# Helpers (blocking; the runtime calls the slow ones in worker threads)


def _check_owner(owner: str) -> None:
    # The owner is a folder name under data_dir: nothing that could climb out of it.
    if not _OWNER.match(owner):
        raise RuntimeFailure(f"owner {owner[:80]!r} is not usable as a folder name")


def _copy_function(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Links are copied as links, never followed: a bundle must not pull host files into the artifact.
    shutil.copytree(source, target, symlinks=True)


def _publish(staging: Path, final: Path) -> None:
    stage.share_read_only(staging)
    if final.exists():  # an earlier attempt at the same version: this one replaces it
        shutil.rmtree(final)
    staging.rename(final)


def _list_artifacts(owner_dir: Path) -> list[Artifact]:
    found: list[Artifact] = []
    if not owner_dir.is_dir():
        return found
    for fn_dir in sorted(owner_dir.iterdir()):
        for version_dir in sorted(fn_dir.glob("v*")):
            number = version_dir.name[1:]
            if version_dir.is_dir() and number.isdigit():
                found.append(Artifact(ref=str(version_dir), function=fn_dir.name, version=int(number)))
    return found


def _remove_version(functions: Path, ref: str) -> None:
    path = Path(ref).absolute()
    if functions not in path.parents or not path.name.startswith("v"):
        raise RuntimeFailure(f"not an artifact of this runtime: {ref!r}")
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):  # the function folder goes with its last version
        path.parent.rmdir()


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


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


def _loopback_address(announced: str) -> str:
    try:
        target = addresses.parse(announced)
    except ValueError as e:
        raise RuntimeFailure(f"the instance announced an address that is not one: {announced[:80]!r}") from e
    if not isinstance(target, addresses.TcpAddress):
        raise RuntimeFailure("an unsandboxed instance announced a Unix socket")
    return f"{INSTANCE_HOST}:{target.port}"


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):  # the owner's folder goes with its last instance
        path.parent.rmdir()


def _folder_names(folder: Path) -> set[str]:
    try:
        return {p.name for p in folder.iterdir() if p.is_dir()}
    except OSError:
        return set()


def _tail(path: Path, lines: int = 20, limit: int = 8192) -> str:
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


def _python_paths() -> list[str]:
    """What the sandboxed interpreter needs of the host: its prefixes and Aube's (editable) sources."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.add(str(Path(sys.executable).resolve().parent.parent))
    for package in INSTANCE_PACKAGES:
        spec = importlib.util.find_spec(package)
        for location in (spec.submodule_search_locations or []) if spec else []:
            paths.add(str(Path(location).resolve()))
    return sandbox.minimal_roots(paths)


def _command(
    spec: InstanceSpec,
    bwrap: str | None,
    fn_dir: Path,
    deps_dir: Path,
    staged: list[tuple[str, str]] | None,
    run_dir: Path,
    seccomp_fd: int | None,
) -> tuple[list[str], dict[str, str]]:
    """The argv and the environment of an instance's session leader.

    `staged` (a root control plane): where `sandbox.stage_plan` put each folder the sandbox binds; without it
    bubblewrap binds the host paths themselves.
    """
    server = [sys.executable, "-m", "aube.instance"]
    inner = instance_environment(spec, 0)
    inner.setdefault("MALLOC_ARENA_MAX", "2")  # glibc reserves 64 MiB of address space per thread arena
    inner.update({sandbox.ENV_SLOT: str(spec.slot), "PATH": sandbox.SANDBOX_PATH, "HOME": "/tmp", "LANG": "C.UTF-8"})
    markers = {
        sandbox.ENV_MANAGED_OWNER: spec.owner,
        sandbox.ENV_SANDBOX: "bwrap" if bwrap else "none",
        names.ENV_INSTANCE_ID: spec.instance_id,
        names.ENV_FUNCTION: spec.function,
        names.ENV_VERSION: str(spec.version),
        sandbox.ENV_SLOT: str(spec.slot),
    }
    if bwrap is None:
        inner.update({"AUBE_INSTANCE_HOST": INSTANCE_HOST, "AUBE_FN_DIR": str(fn_dir), "PYTHONPATH": str(deps_dir)})
        return server, {**inner, **markers}
    inner.update(
        {
            "AUBE_INSTANCE_SOCKET": f"{sandbox.SANDBOX_RUN_DIR}/{sandbox.SOCKET_NAME}",
            "AUBE_FN_DIR": sandbox.SANDBOX_FN_DIR,
            "PYTHONPATH": sandbox.SANDBOX_DEPS_DIR,
        }
    )
    python = _python_paths()
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


def _read_stat(pid: int) -> sandbox.ProcStat | None:
    try:
        return sandbox.parse_stat(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError, IndexError):
        return None


def _read_info(pid: int) -> sandbox.ProcInfo | None:
    stat = _read_stat(pid)
    if stat is None:
        return None
    try:
        environ = sandbox.parse_environ(Path(f"/proc/{pid}/environ").read_bytes())
    except OSError:
        environ = {}
    return sandbox.ProcInfo(stat=stat, environ=environ)


def _all_stats() -> list[sandbox.ProcStat]:
    stats = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _read_stat(int(entry))) is not None:
            stats.append(stat)
    return stats


def _scan_leaders() -> list[sandbox.ProcInfo]:
    """Session leaders with their environment (everyone else cannot be an instance, so is not read)."""
    found = []
    for stat in _all_stats():
        if stat.session != stat.pid:
            continue
        try:
            environ = sandbox.parse_environ(Path(f"/proc/{stat.pid}/environ").read_bytes())
        except OSError:  # gone meanwhile, or not ours to read
            continue
        found.append(sandbox.ProcInfo(stat=stat, environ=environ))
    return found


def _signal_instance(pid: int, starttime: int, signum: int, sandboxed: bool) -> None:
    stats = _all_stats()
    leader = next((s for s in stats if s.pid == pid), None)
    if sandbox.is_gone(leader, starttime):  # checked on the same snapshot: never signal a recycled pid
        return
    for target in sandbox.signal_targets(stats, pid, sandboxed=sandboxed):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(target, signum)
    if not sandboxed:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signum)


def _reap(pid: int, starttime: int, wait: float = 0.0) -> None:
    """Collect the exit status of the instance if it is our child (no zombie is left); others reap their own.

    `wait` blocks (in a worker thread) for a child that was just signalled: `poll()` alone can miss a child that
    is still dying, or one whose status another thread is collecting at that moment, and leave a zombie behind.
    """
    proc = _CHILDREN.get(pid)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait) if wait > 0 else proc.poll()
        if proc.returncode is not None:
            del _CHILDREN[pid]
        return
    # Not started by this process, but it may still be our child: adopted when this process is a child
    # subreaper (prctl PR_SET_CHILD_SUBREAPER) and the control plane that started it died. Only that process,
    # named by its start time: never the recycled pid of another child of ours.
    stat = _read_stat(pid)
    if stat is not None and stat.starttime == starttime and stat.state == "Z":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def _reap_all() -> None:
    for pid, proc in list(_CHILDREN.items()):
        if proc.poll() is not None:
            del _CHILDREN[pid]
