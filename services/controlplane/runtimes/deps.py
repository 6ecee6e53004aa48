"""Install a function's requirements.txt into a folder on the host, from wheels, in a sandbox.

Both runtimes use it: the process runtime puts the folder on the instance's PYTHONPATH, the docker runtime
copies it into the image, so the image build itself needs no network. Wheels are fetched by the host's pip
(PyPI is reachable from the host, never from inside a build). The host runs CPython 3.11 like the base image,
so the wheels fit.

The deployer's file is never given to pip: it is parsed (`aube.controlplane.requirements`, which the upload
already checked) and pip reads a file written here from the parsed requirements. pip runs as `pipsandbox`
describes: wheels only, an unprivileged user, bubblewrap where it works, an environment with no platform secret.

Installed sets are cached under `<cache>/sites/<digest of the requirements>`, so a re-upload with unchanged
requirements is a copy; pip's own cache is `<cache>/pip-build/cache`, owned by the build user (inside a folder
only the control plane enters).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import anyio.to_thread

from aube.controlplane import requirements as reqs
from aube.controlplane.runtimes import pipsandbox
from aube.controlplane.runtimes.base import BuildLog
from aube.shared.errors import BuildFailed, InvalidBundle

logger = logging.getLogger(__name__)

MAX_LOG_LINES = 200  # build output lines forwarded as build events; the rest is counted, not sent
MAX_LINE_CHARS = 1000
ERROR_TAIL_LINES = 12  # pip's last lines quoted in build_failed


class BuildOutput:
    """pip's output, bounded: the first MAX_LOG_LINES lines go to the build log, the last ones are kept for the
    error message, and no line grows past MAX_LINE_CHARS however long pip's is."""

    def __init__(self, log: BuildLog, rename: Mapping[str, str]) -> None:
        self._log = log
        self._rename = rename  # host path -> what the deployer sees (the sandbox's names)
        self._partial = b""
        self.forwarded = 0
        self.dropped = 0
        self.tail: deque[str] = deque(maxlen=ERROR_TAIL_LINES)

    def feed(self, chunk: bytes) -> None:
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        if len(self._partial) > MAX_LINE_CHARS * 4:  # a "line" with no end: cut it here
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            self._line(line)

    def close(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = b""
        if self.dropped:
            self._log(f"[{self.dropped} more lines of pip output not shown]")

    def _line(self, raw: bytes) -> None:
        text = raw.decode(errors="replace").rstrip("\r")
        for host, shown in self._rename.items():
            text = text.replace(host, shown)
        if len(text) > MAX_LINE_CHARS:
            text = text[:MAX_LINE_CHARS] + " [...]"
        if not text.strip():
            return
        self.tail.append(text)
        if self.forwarded < MAX_LOG_LINES:
            self.forwarded += 1
            self._log(text)
        else:
            self.dropped += 1


async def install_requirements(
    requirements: Path, target: Path, cache_dir: Path, log: BuildLog, timeout: float
) -> None:
    """Fill `target` with the requirements' packages (empty when there are none); BuildFailed on error.

    Installed sets are cached by the digest of the requirements, so an unchanged requirements.txt is a copy.
    """
    await anyio.Path(target).mkdir(parents=True, exist_ok=True)
    # Parsed again, though the upload checked it: pip only ever reads a file the platform wrote.
    try:
        wanted = await anyio.to_thread.run_sync(reqs.load_requirements, requirements.parent)
    except InvalidBundle as e:
        raise BuildFailed(f"requirements.txt could not be installed: {e.message}") from e
    if not wanted:
        return
    cached = cache_dir / "sites" / reqs.digest(wanted)
    if not cached.exists():
        log(f"installing requirements: {' '.join(str(r) for r in wanted)}")
        staged = await _install(reqs.render(wanted), cache_dir, log, timeout)
        try:
            # A private name first: two uploads with the same requirements may install at the same moment.
            partial = cached.with_name(f"{cached.name}.partial-{uuid.uuid4().hex[:8]}")
            try:
                await anyio.to_thread.run_sync(_copy_owned, staged / "target", partial)
                partial.rename(cached)
            except OSError as e:  # the other upload finished first (its copy is as good as ours), or a disk error
                if not cached.exists():
                    logger.warning("could not store installed requirements in %s: %s", cached, e)
                    raise BuildFailed("could not store the installed requirements (see the control plane's log)") from e
            finally:
                await anyio.to_thread.run_sync(functools.partial(shutil.rmtree, partial, ignore_errors=True))
        finally:
            await anyio.to_thread.run_sync(functools.partial(shutil.rmtree, staged, ignore_errors=True))
    await anyio.to_thread.run_sync(
        functools.partial(shutil.copytree, cached, target, dirs_exist_ok=True, symlinks=True)
    )


# ---------------------------------------------------------------------------------------------------------
# Running pip


class Sandbox:
    """How this host runs a build: as which user, in bubblewrap or not (decided once per process)."""

    def __init__(self, *, as_root: bool, bwrap: str | None, setpriv: str | None) -> None:
        self.as_root = as_root
        self.bwrap = bwrap
        self.setpriv = setpriv

    def owner(self) -> tuple[int, int] | None:
        """Who must own the build's writable folders (None: the control plane's own user)."""
        return (pipsandbox.NOBODY_UID, pipsandbox.NOBODY_GID) if self.as_root else None

    def command(
        self, inner: Sequence[str], host: pipsandbox.Layout, environ: Mapping[str, str]
    ) -> tuple[list[str], dict[str, str]]:
        """argv and environment that run `inner` (written with the paths of `layout()`) in this sandbox."""
        drop = pipsandbox.drop_privileges(self.setpriv) if self.as_root and self.setpriv else []
        if self.bwrap is None:
            return [*drop, *inner], pipsandbox.pip_environment(environ, host)
        env = pipsandbox.pip_environment(environ, pipsandbox.Layout.inside())
        ro_paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, *pipsandbox.operator_paths(environ)]
        argv = pipsandbox.bwrap_argv(
            self.bwrap, as_root=self.as_root, host=host, ro_paths=ro_paths, env=env, command=[*drop, *inner]
        )
        # bubblewrap itself needs nothing from the environment; its child's comes from --setenv only.
        return argv, {"PATH": pipsandbox.SANDBOX_PATH}

    def layout(self, host: pipsandbox.Layout) -> pipsandbox.Layout:
        return host if self.bwrap is None else pipsandbox.Layout.inside()


_SANDBOX: Sandbox | None = None


def _probe(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def build_sandbox() -> Sandbox:
    """The sandbox this host allows, decided once: as root, uid 65534 (setpriv is required); bubblewrap if a probe
    sandbox with the build's namespaces starts."""
    global _SANDBOX
    if _SANDBOX is None:
        as_root = os.geteuid() == 0
        setpriv = shutil.which("setpriv")
        if as_root and setpriv is None:
            raise BuildFailed("installing requirements needs setpriv (util-linux) to drop root; ask the operator")
        bwrap = shutil.which("bwrap")
        if bwrap is not None and not _probe(pipsandbox.probe_argv(bwrap, as_root=as_root, setpriv=setpriv)):
            logger.warning("bubblewrap does not start here: requirements are installed without it")
            bwrap = None
        if not as_root:
            logger.warning("the control plane is not root: pip runs as its user (uid %d), not as 65534", os.geteuid())
        elif bwrap is None and not _open_to_others(sys.executable):
            # On the host itself uid 65534 must reach the interpreter (a pyenv build under /root, say, it cannot).
            logger.error("uid 65534 cannot run %s: install bubblewrap to install requirements", sys.executable)
            raise BuildFailed("installing requirements is not possible on this host; ask the operator (bubblewrap)")
        _SANDBOX = Sandbox(as_root=as_root, bwrap=bwrap, setpriv=setpriv)
    return _SANDBOX


def _open_to_others(executable: str) -> bool:
    """Whether any user may traverse to, and run, `executable` and its virtualenv's base interpreter."""
    for path in {Path(executable).resolve(), Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}:
        for folder in [path, *path.parents]:
            mode = folder.stat().st_mode
            if not mode & stat.S_IXOTH or (folder == path and stat.S_ISDIR(mode) and not mode & stat.S_IROTH):
                return False
    return True


def _prepare_area(sandbox: Sandbox, cache_dir: Path, requirements: str) -> tuple[Path, pipsandbox.Layout]:
    """A fresh build folder holding `requirements` (and pip's cache), writable by the build user. Without
    bubblewrap the build user must reach them on the host itself, so they live in the system temp folder then
    (and pip's cache is per build)."""
    if sandbox.bwrap is not None:
        # Inside folders only the control plane may enter (bubblewrap binds them as root): no process of the
        # build user's uid outside a sandbox (an unsandboxed instance, say) can reach a build or pip's cache.
        base, holder = cache_dir / "builds", cache_dir / "pip-build"
        for closed in (base, holder):
            closed.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(closed, 0o700)
        work = Path(tempfile.mkdtemp(prefix="pip-", dir=base))
        pip_cache = holder / "cache"
    else:
        work = Path(tempfile.mkdtemp(prefix="aube-pip-"))
        pip_cache = work / "cache"
    layout = pipsandbox.Layout.under(str(work), str(pip_cache))
    owner = sandbox.owner()
    for folder in (layout.target, layout.home, layout.tmp, layout.cache):
        Path(folder).mkdir(parents=True, exist_ok=True)
        if owner is not None and Path(folder).stat().st_uid != owner[0]:
            os.chown(folder, *owner)
    Path(layout.requirements).write_text(requirements)
    os.chmod(layout.requirements, 0o644)
    if owner is not None and sandbox.bwrap is None:
        os.chown(work, *owner)  # only the build user: the area holds nothing anyone else needs
    return work, layout


async def run_sandboxed(
    inner: Sequence[str], sandbox: Sandbox, host: pipsandbox.Layout, output: BuildOutput, timeout: float
) -> int | None:
    """Run `inner` in the sandbox, feeding its output to `output`; its exit status, or None on timeout."""
    argv, env = sandbox.command(inner, host, os.environ)
    process = await anyio.open_process(
        argv, stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env, cwd=host.home, start_new_session=True
    )
    try:
        with anyio.move_on_after(timeout):
            assert process.stdout is not None
            async for chunk in process.stdout:
                output.feed(chunk)
            return await process.wait()
        return None
    finally:
        output.close()
        if process.returncode is None:
            # The whole session: pip may have children (and bubblewrap dies with its parent anyway).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            with anyio.CancelScope(shield=True):
                await process.wait()
        await process.aclose()


async def _install(text: str, cache_dir: Path, log: BuildLog, timeout: float) -> Path:
    """Run pip in the sandbox; the build folder whose `target` holds the packages, or BuildFailed."""
    sandbox = await anyio.to_thread.run_sync(build_sandbox)
    work, host = await anyio.to_thread.run_sync(_prepare_area, sandbox, cache_dir, text)
    try:
        inside = sandbox.layout(host)
        # Without bubblewrap pip names host paths in its output: show them under the sandbox's names.
        rename = {str(work): pipsandbox.SANDBOX_ROOT} if sandbox.bwrap is None else {}
        output = BuildOutput(log, rename)
        status = await run_sandboxed(pipsandbox.pip_command(sys.executable, inside), sandbox, host, output, timeout)
        if status is None:
            raise BuildFailed(f"installing requirements took longer than {timeout:g}s")
        if status != 0:
            tail = "\n".join(output.tail)
            raise BuildFailed(f"requirements.txt could not be installed:\n{tail}")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return work


def _copy_owned(source: Path, dest: Path) -> None:
    """Copy what the build user wrote into a folder the control plane owns: regular files and folders only (pip
    makes no links from wheels), permissions reduced to rw-r--r-- or rwxr-xr-x (no setuid, no device, no fifo
    to hang a reader)."""
    dest.mkdir(parents=True)
    for root, dirs, files in os.walk(source):
        rel = Path(root).relative_to(source)
        for name in [*dirs, *files]:
            path, out = Path(root) / name, dest / rel / name
            info = path.lstat()
            if stat.S_ISDIR(info.st_mode):
                out.mkdir(mode=0o755)
            elif stat.S_ISREG(info.st_mode):
                _copy_file(path, out, executable=bool(info.st_mode & 0o111))
        dirs[:] = [d for d in dirs if not (Path(root) / d).is_symlink()]


def _copy_file(path: Path, out: Path, *, executable: bool) -> None:
    # O_NOFOLLOW|O_NONBLOCK and a second look at what was opened: a file swapped for a link or a fifo since the
    # lstat is skipped, never followed or waited on.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as source:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        with out.open("xb") as target:
            shutil.copyfileobj(source, target)
    out.chmod(0o755 if executable else 0o644)
