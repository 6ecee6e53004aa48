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
Limits: RLIMIT_AS from the manifest's `memory`, no core dumps and no file larger than `output_max_file_bytes` (its
output files stay bounded however fast it writes or whatever it ftruncates them to), always (`sandbox.rlimits`);
`cpus`, `pids` and resident `memory` through cgroups where the host lets this process write them (`cgroups.py`),
which the log says at the first start.

Zygote (`settings.zygote`, sandboxed by root only): bubblewrap runs a holder, and the instance is forked into that
sandbox from a per-version zygote that has imported the server (`zygote.py`, `zygotes.py`); else it fails over to
a fresh interpreter.

Exits are noticed through a pidfd per instance leader (`watch_exits`, `leaders.ExitWatch`): the event loop reads
it, and it becomes readable the moment the leader ends, whether this process started it or adopted it after a
restart (a pidfd does not need the process to be a child). The leader is bubblewrap's outer process in the sandbox,
which ends with the instance inside it.

This module is the runtime itself: its state (sandbox and cgroups decided once, instances starting, exit watches)
and the order of each operation: start, stop, list (and remove leftovers), watch exits. What needs none of that
state lives beside it: `launch.py` how a leader is started (argv and environment, the spawn, its announced
address), `leaders.py` the leaders as processes (/proc, our children, signals, reaping, pidfds), `versions.py` the
version folders (prepare, list, remove); `sandbox.py` holds the decisions without I/O.

Layout under `data_dir`:
    functions/<owner>/<name>/v<version>/fn      the function folder (the artifact is the version folder: versions.py)
    functions/<owner>/<name>/v<version>/deps    its requirements, installed from wheels
    cache/                                      pip's cache and installed requirement sets (see deps.py)
    logs/<owner>/<instance id>/                 an instance's stdout, stderr and whose they are (output.py, read
                                                for `aube logs`); removed when it is stopped
and under `socket_dir` (/run/aube for root: a Unix socket path holds 107 bytes, a data dir path often more):
    <owner>/<instance id>/instance.sock         a sandboxed instance's socket (see `stage.make_run_dir`)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import signal
from pathlib import Path

import anyio
import anyio.to_thread

from aube.controlplane.runtimes import cgroups, launch, leaders, output, sandbox, seccomp, stage, versions, zygotes
from aube.controlplane.runtimes.base import (
    Artifact,
    BuildLog,
    ExitListener,
    InstanceSpec,
    Inventory,
    RunningInstance,
    StartedInstance,
)
from aube.shared import addresses, names
from aube.shared.errors import RuntimeFailure
from aube.shared.schemas import Manifest, RuntimeKind
from aube.shared.settings import ControlPlaneSettings

logger = logging.getLogger(__name__)

# Seconds a stopped instance gets between SIGTERM and SIGKILL, and then to go after SIGKILL.
STOP_GRACE = 3.0
# sun_path holds 108 bytes with the terminating NUL.
MAX_SOCKET_PATH = 107
KILL_WAIT = 2.0


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
        self._exit_watches: dict[str, leaders.ExitWatch] = {}  # by owner, while `watch_exits` runs
        self._zygotes = zygotes.Zygotes()

    # -----------------------------------------------------------------------------------------------------
    # Artifacts

    async def prepare(
        self, name: str, version: int, bundle_dir: Path, manifest: Manifest, owner: str, log: BuildLog
    ) -> str:
        return await versions.prepare(
            self._functions,
            self._data / "cache",
            self._settings.build_timeout,
            name,
            version,
            bundle_dir,
            manifest,
            owner,
            log,
        )

    async def artifacts(self, owner: str) -> list[Artifact]:
        versions.check_owner(owner)
        return await anyio.to_thread.run_sync(versions.list_artifacts, self._functions / owner)

    async def remove_artifact(self, ref: str) -> None:
        await self._zygotes.stop(ref)
        await anyio.to_thread.run_sync(versions.remove_version, self._functions, ref)

    # -----------------------------------------------------------------------------------------------------
    # Instances

    async def start(self, spec: InstanceSpec) -> StartedInstance:
        bwrap = await self._sandbox()
        # A zygote needs bubblewrap and root: an instance joins its sandbox's namespaces from outside (zygote.py).
        if bwrap is not None and self._privileged and self._settings.zygote == "on":
            try:
                return await self._start(spec, forked=True)
            except zygotes.ZygoteFailure as e:
                logger.warning("instance %s could not be forked from a zygote, started afresh: %s", spec.instance_id, e)
        return await self._start(spec, forked=False)

    async def _start(self, spec: InstanceSpec, *, forked: bool) -> StartedInstance:
        versions.check_owner(spec.owner)
        version_dir = Path(spec.artifact)
        fn_dir, deps_dir = version_dir / "fn", version_dir / "deps"
        if not fn_dir.is_dir():
            raise RuntimeFailure(f"artifact {spec.artifact!r} has no function folder (was it removed?)")
        try:
            limits = sandbox.rlimits(spec.manifest.limits.memory, self._settings.output_max_file_bytes)
        except ValueError as e:
            raise RuntimeFailure(f"limits.memory: {e}") from e
        bwrap = await self._sandbox()
        out_dir = self._out_dir(spec.owner, spec.instance_id)
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
        holder_ends: tuple[int, int] | None = None  # the holder's stdin and stdout
        ours: tuple[int, int] = (-1, -1)  # the other ends: the sandbox's ready signal, the instance's keepalive
        try:
            if bwrap is not None:
                await anyio.to_thread.run_sync(
                    stage.make_run_dir, self._runs, run_dir, self._uid() if self._privileged else None
                )
                plan = sandbox.stage_plan([*launch.python_paths(), str(fn_dir), str(deps_dir), str(run_dir)])
            # The filter reaches bubblewrap as the inherited descriptor its --seccomp argument names.
            filter_fd = stage.memfd(self._seccomp) if bwrap is not None else None
            output.make_folder(
                out_dir, output.OutputOf(function=spec.function, instance_id=spec.instance_id, tenant=spec.tenant)
            )
            staged = plan if self._privileged else None
            argv, env = launch.command(spec, bwrap, fn_dir, deps_dir, staged, run_dir, filter_fd, holder=forked)
            if forked:
                keep_r, keep_w = os.pipe()
                ready_r, ready_w = os.pipe()
                holder_ends, ours = (keep_r, ready_w), (ready_r, keep_w)
            procs = await self._create_groups(spec, limits["RLIMIT_AS"])
            try:
                drop = self._uid() if bwrap and self._privileged else None
                handle = launch.spawn(
                    argv, env, fn_dir, out_dir, limits, procs, plan if bwrap else None, filter_fd, drop, holder_ends
                )
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
            for fd in holder_ends or ():
                os.close(fd)
        try:
            if forked:
                # Only the instance may hold the keepalive: ours goes whether the fork worked or not.
                try:
                    request = zygotes.fork_request(launch.inner_environment(spec, bwrap, fn_dir, deps_dir), self._uid(),
                                                   limits, procs)  # fmt: skip
                    leader, _ = sandbox.parse_handle(handle)
                    await zygotes.fork_into(self._zygotes, spec.artifact, self._seccomp, leader, *ours, out_dir,
                                            request, self._settings.health_timeout)  # fmt: skip
                finally:
                    for fd in ours:
                        os.close(fd)
            announced = await launch.wait_listening(
                handle, out_dir, self._settings.health_timeout, 0.005 if forked else 0.02
            )
            if bwrap is not None:
                await anyio.to_thread.run_sync(stage.lock_run_dir, run_dir, self._privileged)
                address = addresses.unix(socket_path)
            else:
                address = launch.loopback_address(announced)
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
        info = await anyio.to_thread.run_sync(leaders.read_info, pid)
        if info is None or sandbox.is_gone(info.stat, starttime):
            leaders.reap(pid, starttime)
            return
        sandboxed = info.environ.get(sandbox.ENV_SANDBOX) == "bwrap"
        await anyio.to_thread.run_sync(leaders.signal_instance, pid, starttime, signal.SIGTERM, sandboxed)
        adopted = self._zygotes.pids() if sandboxed else None
        if not await leaders.wait_gone(pid, starttime, STOP_GRACE, adopted):
            logger.info("instance %s did not end within %gs of SIGTERM: SIGKILL", handle, STOP_GRACE)
            await anyio.to_thread.run_sync(leaders.signal_instance, pid, starttime, signal.SIGKILL, sandboxed)
            if not await leaders.wait_gone(pid, starttime, KILL_WAIT, adopted):
                # Only bubblewrap's outer process can be left: its sandbox is gone, so it has nothing to wait for.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                await leaders.wait_gone(pid, starttime, KILL_WAIT)
        if not sandboxed:
            # Whatever the function started and left in the instance's process group goes with it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        await anyio.to_thread.run_sync(leaders.reap, pid, starttime, KILL_WAIT)
        if adopted is not None and leaders.is_subreaper():
            await anyio.to_thread.run_sync(leaders.reap_adopted, adopted)
        owner = info.environ.get(sandbox.ENV_MANAGED_OWNER, "")
        function = info.environ.get(names.ENV_FUNCTION, "")
        instance_id = info.environ.get(names.ENV_INSTANCE_ID, "")
        if owner and function and instance_id and versions.OWNER.match(owner):
            launch.remove_output(self._out_dir(owner, instance_id))
            _remove_tree(self._run_dir(owner, instance_id))
            await self._remove_groups(owner, instance_id)
        logger.info("stopped instance %s", handle)

    async def is_alive(self, handle: str) -> bool:
        try:
            pid, starttime = sandbox.parse_handle(handle)
        except ValueError:
            return False
        info = await anyio.to_thread.run_sync(leaders.read_info, pid)
        gone = info is None or sandbox.is_gone(info.stat, starttime)
        if gone:
            leaders.reap(pid, starttime)
        return not gone

    async def inventory(self, owner: str) -> Inventory:
        return Inventory(instances=await self.instances(owner))  # this machine's instances only

    async def instances(self, owner: str) -> list[RunningInstance]:
        # An instance spawned after the scan below began is not in it: `_fresh` keeps it from being taken for a
        # leftover, until a listing that began after its spawn (which therefore saw it) is done.
        fresh_before = set(self._fresh)
        await self._zygotes.stop_idle(zygotes.IDLE_STOP)  # listings run on every reconcile: a timer of sorts
        leaders.reap_all()
        procs = await anyio.to_thread.run_sync(leaders.scan_leaders)
        owners_leaders = sandbox.find_leaders(procs, owner)
        found: list[RunningInstance] = []
        for leader in owners_leaders:
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
        keep = {leader.environ.get(names.ENV_INSTANCE_ID, "") for leader in owners_leaders}
        groups = await self._groups()
        if groups is not None:
            for instance_id in groups.instance_ids(owner) - keep - self._starting - self._fresh:
                await self._remove_groups(owner, instance_id, wait=0)
        # Socket folders likewise; `_starting` ones belong to instances not spawned yet. (Removing a starting
        # instance's folder made bubblewrap fail its bind: "Can't bind mount ... No such file or directory".)
        for instance_id in _folder_names(self._runs / owner) - keep - self._starting - self._fresh:
            _remove_tree(self._run_dir(owner, instance_id))
        # Output folders of instances that ended without a stop (killed, crashed): their last lines, a traceback
        # say, were shipped within output.POLL of their end; a listing comes much later.
        for instance_id in _folder_names(self._data / "logs" / owner) - keep - self._starting - self._fresh:
            launch.remove_output(self._out_dir(owner, instance_id))
        self._fresh -= fresh_before
        return found

    async def watch_exits(self, owner: str, exited: ExitListener) -> None:
        versions.check_owner(owner)
        if owner in self._exit_watches:
            raise RuntimeFailure(f"the exits of {owner}'s instances are watched already")
        watch = leaders.ExitWatch(asyncio.get_running_loop(), exited)
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
        # Instances outlive the runtime object (the control plane stops them); only reap what has ended. Zygotes
        # do not: a new runtime starts its own.
        await self._zygotes.close()
        leaders.reap_all()

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

    def _out_dir(self, owner: str, instance_id: str) -> Path:
        return self._data / "logs" / owner / instance_id

    async def watch_output(self, owner: str, sink: output.OutputSink) -> None:
        """Ship what the owner's instances write (output.py) until cancelled."""
        versions.check_owner(owner)
        s = self._settings
        reader = output.ProcessOutput(self._data / "logs" / owner, s.log_rate, s.log_burst, s.output_max_file_bytes)
        await reader.watch(sink)

    def _run_dir(self, owner: str, instance_id: str) -> Path:
        return self._runs / owner / instance_id

    def _uid(self) -> tuple[int, int]:
        uid = self._settings.sandbox_uid
        return (uid, uid) if self._privileged else (os.getuid(), os.getgid())


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):  # the owner's folder goes with its last instance
        path.parent.rmdir()


def _folder_names(folder: Path) -> set[str]:
    try:
        return {p.name for p in folder.iterdir() if p.is_dir()}
    except OSError:
        return set()
