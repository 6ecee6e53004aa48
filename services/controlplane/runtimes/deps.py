"""Install a function's requirements.txt into a folder on the host, from wheels.

Both runtimes use it: the process runtime puts the folder on the instance's PYTHONPATH, the docker runtime
copies it into the image, so the image build itself needs no network. Wheels are fetched by the host's pip
(PyPI is reachable from the host, never from inside a build) and cached under the data dir, which makes a
re-upload with unchanged requirements cheap. The host runs CPython 3.11 like the base image, so the wheels fit.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import anyio

from aube.controlplane.runtimes.base import BuildLog
from aube.shared.errors import BuildFailed


def requirements_digest(requirements: Path) -> str:
    lines = [] if not requirements.exists() else requirements.read_text().splitlines()
    wanted = sorted(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    return hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:16]


async def install_requirements(
    requirements: Path, target: Path, cache_dir: Path, log: BuildLog, timeout: float
) -> None:
    """Fill `target` with the requirements' packages (empty when there are none); BuildFailed on error.

    Installed sets are cached by the digest of the requirement lines, so an unchanged requirements.txt is a copy.
    """
    await anyio.Path(target).mkdir(parents=True, exist_ok=True)
    wanted = await anyio.Path(requirements).read_text() if await anyio.Path(requirements).exists() else ""
    if not wanted.strip():
        return
    cached = cache_dir / "sites" / requirements_digest(requirements)
    if not cached.exists():
        # A private staging folder: two uploads with the same requirements may install at the same moment.
        staging = cached.with_name(f"{cached.name}.partial-{uuid.uuid4().hex[:8]}")
        cmd = [
            sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
            "--only-binary=:all:", "--target", str(staging),
            "--cache-dir", str(cache_dir / "pip"), "-r", str(requirements),
        ]  # fmt: skip
        log(f"installing requirements: {' '.join(wanted.split())}")
        with anyio.move_on_after(timeout) as scope:
            result = await anyio.run_process(cmd, check=False, stderr=subprocess.STDOUT)
        if scope.cancelled_caught:
            shutil.rmtree(staging, ignore_errors=True)
            raise BuildFailed(f"installing requirements took longer than {timeout:g}s")
        output = result.stdout.decode(errors="replace")
        for line in output.splitlines()[-20:]:
            log(line)
        if result.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            tail = "\n".join(output.strip().splitlines()[-8:])
            raise BuildFailed(f"requirements.txt could not be installed:\n{tail}")
        try:
            staging.rename(cached)
        except OSError:  # the other upload finished first; its copy is as good as ours
            shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(cached, target, dirs_exist_ok=True, symlinks=True)
