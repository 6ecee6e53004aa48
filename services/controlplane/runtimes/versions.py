"""The process runtime's artifacts: each function version is a folder, `functions/<owner>/<name>/v<version>`
under data_dir, holding the function folder (`fn`) and its requirements installed from wheels (`deps`, `deps.py`).

Apart from the runtime (`process.py`, whose docstring draws the whole layout) because preparing, listing and
removing versions touches no process. A version is built aside and renamed into place, so a failed or cancelled
prepare leaves no half version behind. The owner is a folder name here and under the logs and socket folders too:
`check_owner` keeps it from climbing out.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import uuid
from pathlib import Path

import anyio
import anyio.to_thread

from aube.controlplane.runtimes import deps, sandbox, stage
from aube.controlplane.runtimes.base import Artifact, BuildLog
from aube.shared import names
from aube.shared.errors import BuildFailed, RuntimeFailure
from aube.shared.schemas import Manifest

OWNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_owner(owner: str) -> None:
    # The owner is a folder name under data_dir: nothing that could climb out of it.
    if not OWNER.match(owner):
        raise RuntimeFailure(f"owner {owner[:80]!r} is not usable as a folder name")


async def prepare(
    functions: Path,
    cache: Path,
    build_timeout: float,
    name: str,
    version: int,
    bundle_dir: Path,
    manifest: Manifest,
    owner: str,
    log: BuildLog,
) -> str:
    """Store `bundle_dir` with its requirements installed as version `version` under `functions`; its ref."""
    names.validate_name(name)
    check_owner(owner)
    try:
        sandbox.parse_memory(manifest.limits.memory)
    except ValueError as e:
        raise BuildFailed(f"limits.memory: {e}") from e
    final = functions / owner / name / f"v{version}"
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
            cache,
            log,
            build_timeout,
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


def list_artifacts(owner_dir: Path) -> list[Artifact]:
    found: list[Artifact] = []
    if not owner_dir.is_dir():
        return found
    for fn_dir in sorted(owner_dir.iterdir()):
        for version_dir in sorted(fn_dir.glob("v*")):
            number = version_dir.name[1:]
            if version_dir.is_dir() and number.isdigit():
                found.append(Artifact(ref=str(version_dir), function=fn_dir.name, version=int(number)))
    return found


def remove_version(functions: Path, ref: str) -> None:
    path = Path(ref).absolute()
    if functions not in path.parents or not path.name.startswith("v"):
        raise RuntimeFailure(f"not an artifact of this runtime: {ref!r}")
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):  # the function folder goes with its last version
        path.parent.rmdir()


def _copy_function(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Links are copied as links, never followed: a bundle must not pull host files into the artifact.
    shutil.copytree(source, target, symlinks=True)


def _publish(staging: Path, final: Path) -> None:
    stage.share_read_only(staging)
    if final.exists():  # an earlier attempt at the same version: this one replaces it
        shutil.rmtree(final)
    staging.rename(final)
