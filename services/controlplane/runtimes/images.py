"""The docker runtime's shared images, built on this host without any registry.

    aube-base:bookworm       Debian bookworm (minbase) + python3 + ca-certificates, from `mmdebstrap`,
                             imported with `docker import`. Built once per engine; a configured
                             non-default base image is never built, only used.
    aube-runtime:<digest>    base + the in-instance server (`aube.instance`) and its `websockets`, run as
                             nobody. The digest covers the base image id, the server's sources and the
                             websockets version, so changing any of them yields a new tag.

Function images (built by `docker.py`) start FROM the runtime image. Neither image carries an owner label:
they are shared by every control plane on the engine. Builds run with no network: everything a build copies
was fetched on the host first. Blocking functions: callers on an event loop run them in a worker thread.

Also a command: `python -m aube.controlplane.runtimes.images` builds both (used by CI and `make`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import aube.instance
from aube.controlplane.runtimes.base import BuildLog
from aube.shared import names
from aube.shared.errors import BuildFailed, RuntimeFailure
from aube.shared.settings import DEFAULT_BASE_IMAGE, ControlPlaneSettings, settings_from_env

RUNTIME_REPOSITORY = "aube-runtime"
SUITE = "bookworm"
# Where things live inside the images; the function image fills /opt/aube/deps and /opt/aube/fn. A build
# context mirrors /opt/aube in its `aube/` folder, copied by one COPY: consecutive COPYs where one adds nothing
# (an empty deps folder) make this engine fail with "failed to get layer ... layer does not exist".
AUBE_DIR = "/opt/aube"
LIB_DIR = f"{AUBE_DIR}/lib"
DEPS_DIR = f"{AUBE_DIR}/deps"
FN_DIR = f"{AUBE_DIR}/fn"
CONTEXT_DIR = "aube"
NOBODY = "65534:65534"

# Images are per engine, not per data dir: two control planes (or test runs) with different data dirs share
# one engine, so the lock that serializes builders lives in the host's temp dir.
_LOCK_PATH = Path(tempfile.gettempdir()) / "aube-image-build.lock"

_BASE_CHANGES = [
    f"LABEL {names.LABEL_MANAGED}=true",
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
]


def _websockets_version() -> str:
    return package_version("websockets")


def _image_id(client: Any, ref: str) -> str | None:
    import docker.errors

    try:
        return str(client.images.get(ref).id)
    except docker.errors.ImageNotFound:
        return None


@contextlib.contextmanager
def _build_lock(timeout: float) -> Iterator[None]:
    """Serialize image builders across threads and processes (flock on a fresh open file does both)."""
    deadline = time.monotonic() + timeout
    with open(_LOCK_PATH, "a") as f:
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise RuntimeFailure(
                        f"another process held the image build lock {_LOCK_PATH} for over {timeout:g}s"
                    ) from e
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _run(cmd: list[str], log: BuildLog, timeout: float, what: str) -> None:
    """Run a host command, forwarding its output to `log`; BuildFailed with the tail when it fails."""
    try:
        result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    except FileNotFoundError as e:
        raise BuildFailed(f"{what}: {cmd[0]} is not installed") from e
    except subprocess.TimeoutExpired as e:
        raise BuildFailed(f"{what} took longer than {timeout:g}s") from e
    lines = result.stdout.decode(errors="replace").splitlines()
    for line in lines[-30:]:
        log(line)
    if result.returncode != 0:
        tail = "\n".join(lines[-12:])
        raise BuildFailed(f"{what} failed (exit {result.returncode}):\n{tail}")


def ensure_base_image(client: Any, settings: ControlPlaneSettings, log: BuildLog) -> str:
    """Return the base image's reference, building the default one from Debian packages when missing."""
    wanted = settings.base_image
    if _image_id(client, wanted) is not None:
        return wanted
    if wanted != DEFAULT_BASE_IMAGE:
        raise RuntimeFailure(
            f"base image {wanted!r} (AUBE_BASE_IMAGE) is not in the Docker engine and this engine reaches no "
            f"registry: load it (`docker load`/`docker import`), or unset AUBE_BASE_IMAGE to build "
            f"{DEFAULT_BASE_IMAGE!r} from Debian packages"
        )
    with _build_lock(settings.build_timeout):
        if _image_id(client, wanted) is not None:  # another builder finished while we waited
            return wanted
        _build_base_image(client, wanted, settings, log)
    return wanted


def _build_base_image(client: Any, tag: str, settings: ControlPlaneSettings, log: BuildLog) -> None:
    import docker.errors
    import requests.exceptions

    log(f"building base image {tag} with mmdebstrap (Debian {SUITE}, about a minute)")
    with tempfile.TemporaryDirectory(prefix="aube-base-") as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        cmd = [
            "mmdebstrap", "--variant=minbase", "--include=python3,ca-certificates",
            # Documentation is dead weight in an image nobody logs into.
            "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/info/*", "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            SUITE, str(rootfs),
        ]  # fmt: skip
        _run(cmd, log, settings.build_timeout, "mmdebstrap")
        repository, _, version = tag.rpartition(":")
        log(f"importing {rootfs.stat().st_size // 2**20} MiB root filesystem as {tag}")
        try:
            client.api.import_image_from_file(str(rootfs), repository=repository, tag=version, changes=_BASE_CHANGES)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
            raise BuildFailed(f"docker import of the base image failed: {e}") from e
    if _image_id(client, tag) is None:
        raise BuildFailed(f"docker import reported success but {tag} does not exist")
    log(f"base image {tag} ready")


def _instance_sources() -> list[tuple[str, Path]]:
    root = Path(aube.instance.__file__).parent
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and "__pycache__" not in rel.parts and path.suffix != ".pyc":
            files.append((rel.as_posix(), path))
    return files


def runtime_digest(base_id: str) -> str:
    h = hashlib.sha256()
    h.update(f"base={base_id}\nwebsockets={_websockets_version()}\n".encode())
    for rel, path in _instance_sources():
        h.update(f"{rel}\n".encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def normalize_modes(root: Path) -> None:
    """World-readable, root-owned-in-the-image files: 0755 dirs and executables, 0644 the rest.

    COPY keeps the context's modes; a file that is 0600 on the host would be unreadable for the instance's
    user, and one that is group- or world-writable would let it be changed.
    """
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            executable = os.stat(path).st_mode & 0o111
            os.chmod(path, 0o755 if executable else 0o644)


def build_image(
    client: Any,
    context: Path,
    tag: str,
    log: BuildLog,
    timeout: float,
    *,
    failure_filters: Mapping[str, object] | None = None,
) -> str:
    """Build `context` (which holds a Dockerfile) as `tag` with no network; return the image id.

    On failure raise BuildFailed with the output's tail; intermediate containers are always removed
    (rm/forcerm), and images matching `failure_filters` (the labels the Dockerfile sets first) are removed.
    """
    import docker.errors
    import requests.exceptions

    tail: list[str] = []
    error: str | None = None
    deadline = time.monotonic() + timeout
    try:
        stream = client.api.build(
            path=str(context), tag=tag, rm=True, forcerm=True, pull=False, network_mode="none",
            decode=True, use_config_proxy=False,
        )  # fmt: skip
        try:
            for chunk in stream:
                text = chunk.get("stream") or chunk.get("status") or ""
                for line in str(text).splitlines():
                    if line.strip():
                        tail = [*tail[-19:], line]
                        log(line)
                if "error" in chunk:
                    error = str(chunk.get("error", "")).strip()
                    log(error)
                if time.monotonic() > deadline:
                    error = f"the image build took longer than {timeout:g}s"
                    break
        finally:
            # Closing the response makes the engine cancel a build still running.
            close = getattr(stream, "close", None)
            if close is not None:
                close()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
        error = f"{type(e).__name__}: {e}"
    image_id = None if error else _image_id(client, tag)
    if image_id is None:
        if failure_filters:
            _remove_images(client, failure_filters)
        detail = "\n".join(tail[-10:])
        raise BuildFailed(f"building image {tag} failed: {error or 'no image was produced'}\n{detail}".rstrip())
    return image_id


def _remove_images(client: Any, filters: Mapping[str, object]) -> None:
    import docker.errors
    import requests.exceptions

    try:
        for image in client.api.images(all=True, filters=dict(filters)):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                client.api.remove_image(image["Id"], force=True)
    except (docker.errors.DockerException, requests.exceptions.RequestException):
        pass  # best effort: the failure being reported matters more


def ensure_runtime_image(client: Any, settings: ControlPlaneSettings, log: BuildLog) -> str:
    """Return `aube-runtime:<digest>`, building it (and the base image) when missing."""
    base = ensure_base_image(client, settings, log)
    base_id = _image_id(client, base)
    if base_id is None:
        raise RuntimeFailure(f"base image {base} disappeared while in use")
    tag = f"{RUNTIME_REPOSITORY}:{runtime_digest(base_id)}"
    if _image_id(client, tag) is not None:
        return tag
    with _build_lock(settings.build_timeout):
        if _image_id(client, tag) is not None:
            return tag
        log(f"building runtime image {tag}")
        with tempfile.TemporaryDirectory(prefix="aube-runtime-") as tmp:
            context = Path(tmp)
            _runtime_context(context, base_id, settings, log)
            build_image(client, context, tag, log, settings.build_timeout)
    log(f"runtime image {tag} ready")
    return tag


def _runtime_context(context: Path, base_id: str, settings: ControlPlaneSettings, log: BuildLog) -> None:
    lib = context / CONTEXT_DIR / "lib"
    # The server's websockets goes into lib/, ahead of the function's deps on PYTHONPATH: the connection
    # object a function receives comes from the server's copy, so that is the one `import websockets` must
    # find even when requirements.txt pins another version.
    cmd = [
            sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
            "--only-binary=:all:", "--no-deps", "--target", str(lib),
            "--cache-dir", str(Path(settings.data_dir) / "cache" / "pip"),
            f"websockets=={_websockets_version()}",
    ]  # fmt: skip
    _run(cmd, log, settings.build_timeout, "installing websockets for the runtime image")
    shutil.rmtree(lib / "bin", ignore_errors=True)
    # aube/ stays a namespace package (no __init__.py), holding only the instance server.
    target = lib / "aube" / "instance"
    for rel, path in _instance_sources():
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / rel)
    (context / CONTEXT_DIR / "deps").mkdir()
    (context / CONTEXT_DIR / "fn").mkdir()
    normalize_modes(context)
    (context / "Dockerfile").write_text(
        "\n".join(
            [
                f"FROM {base_id}",
                f"LABEL {names.LABEL_MANAGED}=true",
                f"COPY {CONTEXT_DIR}/ {AUBE_DIR}/",
                f"ENV PYTHONPATH={LIB_DIR}:{DEPS_DIR} PYTHONDONTWRITEBYTECODE=1 HOME=/tmp",
                f"WORKDIR {FN_DIR}",
                f"USER {NOBODY}",
                'ENTRYPOINT ["python3", "-m", "aube.instance"]',
                "",
            ]
        )
    )


def main(argv: list[str] | None = None) -> int:
    """Build the base and runtime images; settings from AUBE_* variables like the control plane's."""
    import docker

    del argv
    settings = settings_from_env(ControlPlaneSettings)

    def log(line: str) -> None:
        print(line, flush=True)

    try:
        client = docker.from_env(timeout=int(settings.build_timeout))
    except docker.errors.DockerException as e:
        print(f"error: no Docker engine answers: {e}", file=sys.stderr)
        return 1
    try:
        tag = ensure_runtime_image(client, settings, log)
    except (BuildFailed, RuntimeFailure) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(json.dumps({"base": settings.base_image, "runtime": tag}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
