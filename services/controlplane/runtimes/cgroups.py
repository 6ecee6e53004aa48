"""cpu, pids and memory limits for process-runtime instances, through cgroup v1 where the host lets us write it.

Each instance gets a group `aube/<owner>/<instance id>` in the cpu, pids and memory hierarchies, below the control
plane's own group in each (so a service manager's accounting and limits still cover its instances). The limits are
written before the instance starts, and the child joins the groups between fork and exec (`join`), so nothing
the function runs ever escapes them: a fork bomb meets `pids.max`, a busy loop gets `cpus` of a core, and
resident memory is bounded (RLIMIT_AS bounds only address space). A group is removed once its instance is gone.

Only cgroup v1 hierarchies that this process may write are used (root on a host that mounts them, as this
project's machines do). Elsewhere `CgroupLimits.detect` returns None and instances run with rlimits alone; the
runtime says so once in its log. cgroup v2 (a unified hierarchy with delegation) is not supported yet.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Mapping
from pathlib import Path

from aube.shared.schemas import LimitsSection

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("cpu", "pids", "memory")
GROUP = "aube"
CPU_PERIOD_US = 100_000


def own_groups(proc_self_cgroup: str) -> dict[str, str]:
    """Controller -> this process's group path, from the text of /proc/self/cgroup (pure)."""
    groups: dict[str, str] = {}
    for line in proc_self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                if controller:
                    groups[controller] = parts[2]
    return groups


def settings_for(limits: LimitsSection, memory_bytes: int) -> dict[str, dict[str, str]]:
    """The files to write in each controller's group, and their values (pure: the unit tests read it)."""
    quota = max(1000, round(limits.cpus * CPU_PERIOD_US))  # the kernel refuses quotas under 1 ms
    return {
        "cpu": {"cpu.cfs_period_us": str(CPU_PERIOD_US), "cpu.cfs_quota_us": str(quota)},
        "pids": {"pids.max": str(limits.pids)},
        "memory": {"memory.limit_in_bytes": str(memory_bytes)},
    }


class CgroupLimits:
    """Creates, joins and removes instance groups under writable cgroup v1 hierarchies."""

    def __init__(self, bases: Mapping[str, Path]) -> None:
        self.bases = dict(bases)  # controller -> the folder holding the owners' groups

    @classmethod
    def detect(cls, root: Path = CGROUP_ROOT) -> tuple[CgroupLimits | None, str]:
        """This host's cgroups if usable, else None; and why, for the log."""
        missing = [c for c in CONTROLLERS if not (root / c / "cgroup.procs").is_file()]
        if missing:
            return None, f"no cgroup v1 hierarchy for {', '.join(missing)} under {root}"
        try:
            own = own_groups(Path("/proc/self/cgroup").read_text())
        except OSError as e:
            return None, f"cannot read /proc/self/cgroup: {e.strerror}"
        bases = {c: root / c / own.get(c, "/").lstrip("/") / GROUP for c in CONTROLLERS}
        try:
            for path in bases.values():
                path.mkdir(exist_ok=True)
        except OSError as e:
            return None, f"cannot create {GROUP} groups under {root}: {e.strerror}"
        if not all(os.access(path, os.W_OK) for path in bases.values()):
            return None, f"the {GROUP} groups under {root} are not writable"
        return cls(bases), f"cgroup v1 ({', '.join(str(p) for p in bases.values())})"

    def _dirs(self, owner: str, instance_id: str) -> list[Path]:
        return [self.bases[c] / owner / instance_id for c in CONTROLLERS]

    def create(self, owner: str, instance_id: str, settings: Mapping[str, Mapping[str, str]]) -> list[str]:
        """Make the instance's groups with their limits; the `cgroup.procs` files the child must join."""
        procs = []
        try:
            for controller, path in zip(CONTROLLERS, self._dirs(owner, instance_id), strict=True):
                _mkdir(path)
                for name, value in settings[controller].items():
                    (path / name).write_text(value)
                procs.append(str(path / "cgroup.procs"))
        except BaseException:
            self.remove(owner, instance_id, wait=0)
            raise
        return procs

    def remove(self, owner: str, instance_id: str, *, wait: float = 2.0) -> bool:
        """Remove the instance's groups; False if one still holds a process after `wait` seconds."""
        deadline = time.monotonic() + wait
        for path in self._dirs(owner, instance_id):
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    # EBUSY: a process of the instance is still exiting (the kernel moves it out as it dies).
                    if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                        return False
                    time.sleep(0.02)
            # The owner's group goes with its last instance (EBUSY while another instance has one).
            with contextlib.suppress(OSError):
                path.parent.rmdir()
        return True

    def instance_ids(self, owner: str) -> set[str]:
        """Instances of `owner` that have a group in any hierarchy."""
        found: set[str] = set()
        for controller in CONTROLLERS:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                found.update(p.name for p in (self.bases[controller] / owner).iterdir() if p.is_dir())
        return found


def _mkdir(path: Path) -> None:
    # The owner's group may be removed (with another instance's) between making it and making ours: again.
    for _ in range(3):
        try:
            path.mkdir(parents=True, exist_ok=True)
            return
        except FileNotFoundError:
            continue
    path.mkdir(parents=True, exist_ok=True)


def join(procs_files: list[str]) -> None:
    """Move the calling process into the groups. Runs in the child between fork and exec: system calls only."""
    for path in procs_files:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, b"0")  # "0" is the writer itself
        finally:
            os.close(fd)
