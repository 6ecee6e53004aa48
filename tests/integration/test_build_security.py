"""Builds against hostile deployers (security issue 8, findings 1, 2 and 10), through a real control plane.

A deployer controls requirements.txt. On the landed code pip read it as a pip requirements file on the host, as
root, in the control plane's environment: `--no-binary` with `--find-links` ran an sdist's build backend there,
`-r /etc/passwd` or `${AUBE_NATS_URL}` quoted host files and the service password back in the `build_failed`
reply, and build events carried pip's output (host paths included) verbatim. Now requirements.txt holds
requirement specifiers only, pip runs from wheels in a sandbox, and replies and events are redacted.
"""

from __future__ import annotations

import base64
import io
import json
import tarfile
import zipfile
from pathlib import Path

import anyio
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from support import accounts_server

from aube.shared import names
from aube.shared.bus import request
from aube.shared.errors import AubeError
from aube.shared.schemas import UploadReply, UploadRequest

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
FN = (REPO / "examples" / "reverse-async" / "fn.py").read_text()
UPLOAD_TIMEOUT = 300.0
PASSWD = Path("/etc/passwd").read_text().splitlines()[0]  # "root:x:0:0:..."


def bundle(files: dict[str, str | bytes]) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return base64.b64encode(buf.getvalue()).decode()


def evil_sdist(marker: Path) -> bytes:
    """An sdist whose in-tree build backend, when imported, writes `marker` with its uid and environment."""
    backend = (
        "import json, os\n"
        f"with open({str(marker)!r}, 'w') as f:\n"
        "    json.dump({'uid': os.getuid(), 'env': dict(os.environ)}, f)\n"
        "def get_requires_for_build_wheel(config_settings=None):\n"
        "    return []\n"
        "def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):\n"
        "    raise RuntimeError('no wheel here')\n"
    )
    files = {
        "PKG-INFO": "Metadata-Version: 2.1\nName: evilpkg\nVersion: 1.0\n",
        "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n',
        "backend.py": backend,
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"evilpkg-1.0/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def upload(nc: NATS, name: str, files: dict[str, str | bytes]) -> UploadReply:
    body = UploadRequest(name=name, zip=bundle(files))
    return await request(nc, names.SUBJECT_UPLOAD, body, UploadReply, UPLOAD_TIMEOUT)


async def refused(nc: NATS, name: str, files: dict[str, str | bytes]) -> AubeError:
    with pytest.raises(AubeError) as caught:
        await upload(nc, name, files)
    return caught.value


async def drain_events(sub: Subscription) -> list[dict[str, object]]:
    events: list[dict[str, object]] = []
    while True:
        try:
            msg = await sub.next_msg(timeout=0.5)
        except nats.errors.TimeoutError:
            return events
        events.append(json.loads(msg.data))


# The sdist attack and the requirement lines that must never reach pip: (requirements.txt, offending line number).
SDIST_ATTACKS = {
    "no-binary + find-links": ("--no-binary evilpkg\n--no-index\n--find-links ./links\nevilpkg\n", 1),
    "no-binary=:all: after a comment": ("# deps\n\n--no-binary=:all:\n-f links\nevilpkg\n", 3),
    "indented option": ("   --no-binary evilpkg\n", 1),
    "direct file URL": ("evilpkg @ file:///{links}/evilpkg-1.0.tar.gz\n", 1),
    "relative path": ("./links/evilpkg-1.0.tar.gz\n", 1),
    "bare archive name": ("evilpkg-1.0.tar.gz\n", 1),
    "per-requirement option": ("evilpkg --config-settings=x=y\n", 1),
    "line continuation": ("evilpkg \\\n  --no-binary evilpkg\n", 1),
    "option inside a marker": ('evilpkg; os_name == " --no-binary evilpkg"\n', 1),
}


@pytest.mark.parametrize("runtime_kind", ["process", pytest.param("docker", marks=pytest.mark.docker)], indirect=True)
async def test_sdist_build_backend_never_runs_on_the_host(platform, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane()
    marker = tmp_path / "marker.json"
    async with await nats.connect(platform.nats_url) as nc:
        for why, (requirements, line) in SDIST_ATTACKS.items():
            files: dict[str, str | bytes] = {
                "fn.py": FN,
                "requirements.txt": requirements.replace("{links}", str(tmp_path / "nowhere")),
                "links/evilpkg-1.0.tar.gz": evil_sdist(marker),
            }
            error = await refused(nc, "sdist", files)
            leaked = json.loads(marker.read_text()) if marker.exists() else None
            assert leaked is None, (
                f"{why}: the build backend ran as uid {leaked['uid']} with AUBE_* variables"
                f" {sorted(k for k in leaked['env'] if k.startswith('AUBE_'))}"
            )
            assert error.code == "bundle_invalid_requirements", (why, error.code, error.message)
            assert f"line {line}" in error.message, (why, error.message)


# Lines that made pip quote host files or the control plane's environment; each must be refused naming its line.
def host_reading_lines(repo: Path) -> dict[str, str]:
    return {
        "include passwd": "-r /etc/passwd",
        "include credentials": f"-r {repo}/.data/credentials.env",
        "constraints": "-c /etc/passwd",
        "long include": "--requirement=/etc/passwd",
        "expand variable": "websockets==${AUBE_NATS_URL}",
        "arbitrary equality variable": "websockets===${AUBE_NATS_URL}",
        "file URL": "pkg @ file:///etc/passwd",
        "https URL": "pkg @ https://127.0.0.1:1/pkg-1.0.tar.gz",
        "local path": "./local/path",
        "editable": "-e .",
        "index with credentials": "--index-url http://user:hunter2secret@127.0.0.1:1/simple",
        "extra index": "--extra-index-url=http://127.0.0.1:1/simple",
        "trusted host": "--trusted-host 127.0.0.1",
        "vcs": "git+https://127.0.0.1:1/x.git",
    }


@pytest.mark.parametrize("runtime_kind", ["process", pytest.param("docker", marks=pytest.mark.docker)], indirect=True)
async def test_requirements_naming_host_files_or_variables_are_refused_without_host_content(
    platform_on, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    with accounts_server(tmp_path / "nats-data") as server:
        platform = platform_on(server.url)
        try:
            await platform.start_controlplane(**server.service_env("controlplane"))
            async with await nats.connect(server.url, **server.options("deployer")) as nc:
                sub = await nc.subscribe(names.events_subject("hostile"))
                for why, line in host_reading_lines(REPO).items():
                    requirements = f"# first a comment\nwebsockets>=12\n{line}\n"
                    error = await refused(nc, "hostile", {"fn.py": FN, "requirements.txt": requirements})
                    assert error.code == "bundle_invalid_requirements", (why, error.code, error.message)
                    assert "line 3" in error.message, (why, error.message)
                    for secret in (*server.all_passwords(), PASSWD, "hunter2secret"):
                        assert secret not in error.message, (why, error.message)
                    assert str(REPO) not in error.message and platform.data_dir not in error.message, error.message
                events = await drain_events(sub)
        finally:
            platform.stop_all()  # before the server goes; the fixture checks for leftovers
        failed = [e for e in events if e["event"] == "failed"]
        assert len(failed) == len(host_reading_lines(REPO))
        text = json.dumps(events)
        for secret in (*server.all_passwords(), PASSWD, "hunter2secret"):
            assert secret not in text
        assert str(REPO) not in text and platform.data_dir not in text


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_failed_and_successful_builds_show_no_host_path_and_no_password(platform_on, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """pip's own output names the operator's find-links folder (here inside the data dir) and the process runtime
    says where it prepared a version: neither path, nor the NATS password, reaches replies or events."""
    with accounts_server(tmp_path / "nats-data") as server:
        platform = platform_on(server.url)
        wheels = Path(platform.data_dir) / "wheels"
        wheels.mkdir(parents=True)
        try:
            env = server.service_env("controlplane")
            await platform.start_controlplane(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels), **env)
            async with await nats.connect(server.url, **server.options("deployer")) as nc:
                sub = await nc.subscribe(names.events_subject("leaky"))
                with anyio.fail_after(UPLOAD_TIMEOUT):
                    requirements = "aube-no-such-package==1.0\n"
                    error = await refused(nc, "leaky", {"fn.py": FN, "requirements.txt": requirements})
                assert error.code == "build_failed", error.message
                assert "aube-no-such-package" in error.message  # the reason stays readable
                ready = await upload(nc, "leaky", {"fn.py": FN})
                assert ready.ok
                events = await drain_events(sub)
        finally:
            platform.stop_all()
        builds = [e for e in events if e["event"] == "build"]
        assert builds, events
        text = json.dumps(events) + error.message
        assert platform.data_dir not in text, [e for e in events if platform.data_dir in json.dumps(e)]
        assert str(tmp_path) not in text
        for secret in server.all_passwords():
            assert secret not in text


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_start_failures_name_no_host_path(platform) -> None:  # type: ignore[no-untyped-def]
    """Unsandboxed, a crashing function's traceback names its host folder (under the data dir); the reply, the
    failed event and the build events show placeholders instead."""
    await platform.start_controlplane(AUBE_SANDBOX="none", AUBE_HEALTH_TIMEOUT="8")
    crashing = "import os, sys\nprint('running from', os.path.abspath(__file__), flush=True)\nsys.exit(3)\n"
    async with await nats.connect(platform.nats_url) as nc:
        sub = await nc.subscribe(names.events_subject("crashing"))
        error = await refused(nc, "crashing", {"fn.py": crashing + "def fn(websocket):\n    pass\n"})
        events = await drain_events(sub)
    assert error.code in ("runtime_failure", "health_check_failed"), error.message
    assert "running from <data>/" in error.message, error.message
    text = json.dumps(events) + error.message
    assert platform.data_dir not in text and str(REPO) not in text
