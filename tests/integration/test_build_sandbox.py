"""pip's sandbox for real (bubblewrap, setpriv, pip): who the build runs as, what it sees, what it leaves.

The probe runs a Python snippet through the very sandbox pip gets; the pip runs install a hand-made wheel from an
operator's find-links folder with no index, so no test here leaves the machine.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

import anyio
import pytest

from aube.controlplane.runtimes import deps, pipsandbox
from aube.shared.errors import BuildFailed

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "Zq8wRt5yUi2oPa7sDf4gHj1kLx6cVb9n"

PROBE = r"""
import json, os
def visible(path):
    try:
        if os.path.isdir(path):
            return sorted(os.listdir(path))
        open(path, "rb").close()
        return True
    except OSError:
        return False
def writable(path):
    try:
        with open(os.path.join(path, "probe"), "w"):
            pass
        return True
    except OSError:
        return False
report = json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "env": dict(os.environ),
    "status": open("/proc/self/status").read(), "pids": [p for p in os.listdir("/proc") if p.isdigit()],
    "seen": {p: visible(p) for p in PATHS},
    "writable": {p: writable(p) for p in ("/build/target", "/build/cache", "/usr", "/etc", "/")},
})
with open("/build/target/probe.json", "w") as f:
    f.write(report)
"""


def needs_root_and_bwrap() -> deps.Sandbox:
    if os.geteuid() != 0:
        pytest.skip("the drop to uid 65534 needs root")
    sandbox = deps.build_sandbox()
    if sandbox.bwrap is None:
        pytest.skip("bubblewrap does not start here")
    return sandbox


def secret_environment(monkeypatch: pytest.MonkeyPatch, data: Path) -> None:
    """The control plane's environment as `aube start` makes it: a service password in AUBE_NATS_URL."""
    monkeypatch.setenv("AUBE_NATS_URL", f"nats://aube:{PASSWORD}@127.0.0.1:4222")
    monkeypatch.setenv("AUBE_NATS_SERVICE_PASSWORD", PASSWORD)
    monkeypatch.setenv("AUBE_DATA_DIR", str(data))
    monkeypatch.setenv("PYTHONPATH", str(REPO))


async def test_the_build_runs_as_65534_sees_no_secret_and_no_host_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = needs_root_and_bwrap()
    data = tmp_path / "data"
    (data / "functions").mkdir(parents=True)
    (data / "credentials.env").write_text(f"AUBE_NATS_SERVICE_PASSWORD={PASSWORD}\n")
    secret_environment(monkeypatch, data)
    paths = [str(data), str(data / "credentials.env"), str(REPO), str(REPO / ".data"), "/root", "/etc/shadow", "/work"]
    work, host = deps._prepare_area(sandbox, data / "cache", "")
    try:
        seen: list[str] = []
        output = deps.BuildOutput(seen.append, {})
        code = f"PATHS = {paths!r}\n{PROBE}"
        status = await deps.run_sandboxed([sys.executable, "-I", "-c", code], sandbox, host, output, 60)
        assert status == 0, seen
        probe = json.loads(Path(host.target, "probe.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert (probe["uid"], probe["gid"], probe["groups"]) == (65534, 65534, [])
    status_lines = dict(line.split(":\t", 1) for line in probe["status"].splitlines() if ":\t" in line)
    assert status_lines["CapEff"].strip("0\n ") == "" and status_lines["CapBnd"].strip("0\n ") == ""
    assert status_lines["NoNewPrivs"].strip() == "1"
    assert not any(k.startswith(("AUBE_", "PYTHON")) for k in probe["env"] if k != "PYTHONDONTWRITEBYTECODE")
    assert PASSWORD not in json.dumps(probe["env"])
    # Nothing of the host's folders shows but the way to the interpreter (mount points of the read-only binds).
    interpreter = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix)}
    for path, seen in probe["seen"].items():
        if seen is False:
            continue
        assert isinstance(seen, list), (path, seen)
        for entry in seen:
            assert any(Path(path, entry) in (i, *i.parents) for i in interpreter), (path, seen)
    for hidden in (data, data / "credentials.env", REPO / ".data", "/etc/shadow"):
        assert probe["seen"][str(hidden)] is False, hidden
    assert len(probe["pids"]) <= 3  # a pid namespace of its own: bubblewrap's init, python (and setpriv's exec)
    assert probe["writable"] == {"/build/target": True, "/build/cache": True, "/usr": False, "/etc": False, "/": False}


def wheel(name: str, version: str) -> tuple[str, bytes]:
    """A minimal pure-Python wheel holding `<name>/__init__.py`."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n".encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: aube-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    files[f"{dist}/RECORD"] = ("\n".join([*record, f"{dist}/RECORD,,"]) + "\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return f"{name}-{version}-py3-none-any.whl", buf.getvalue()


def sdist(name: str, marker: Path) -> tuple[str, bytes]:
    """An sdist whose build backend would write `marker` if pip ever built it."""
    files = {
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n',
        "backend.py": f"open({str(marker)!r}, 'w').write('built')\n",
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path, text in files.items():
            info = tarfile.TarInfo(f"{name}-1.0/{path}")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return f"{name}-1.0.tar.gz", buf.getvalue()


async def test_pip_installs_from_wheels_only_and_the_set_is_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    needs_root_and_bwrap()
    data = tmp_path / "data"
    links = tmp_path / "links"
    links.mkdir(mode=0o755)
    marker = tmp_path / "built"
    for filename, blob in (wheel("aubetiny", "1.0"), sdist("aubeevil", marker)):
        (links / filename).write_bytes(blob)
    secret_environment(monkeypatch, data)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("PIP_NO_BINARY", ":all:")  # not passed on: nothing re-enables sdists
    fn = tmp_path / "fn"
    fn.mkdir()
    log: list[str] = []

    (fn / "requirements.txt").write_text("# one wheel\naubetiny==1.0\n")
    await deps.install_requirements(fn / "requirements.txt", tmp_path / "t1", data / "cache", log.append, 120)
    assert (tmp_path / "t1" / "aubetiny" / "__init__.py").read_text() == "VERSION = '1.0'\n"
    assert any("installing requirements: aubetiny==1.0" in line for line in log)
    sites = list((data / "cache" / "sites").iterdir())
    assert len(sites) == 1 and all(p.stat().st_uid == 0 for p in sites[0].rglob("*"))
    assert (data / "cache" / "pip-build" / "cache").stat().st_uid == pipsandbox.NOBODY_UID
    for closed in ("pip-build", "builds"):  # no 65534 process outside a sandbox reaches a build or the cache
        assert (data / "cache" / closed).stat().st_mode & 0o777 == 0o700
    assert not any((data / "cache" / "builds").iterdir())  # the build folder is gone

    log.clear()
    (fn / "requirements.txt").write_text("aubetiny == 1.0  # same set, spelt differently\n")
    await deps.install_requirements(fn / "requirements.txt", tmp_path / "t2", data / "cache", log.append, 120)
    assert log == [] and (tmp_path / "t2" / "aubetiny" / "__init__.py").exists()

    for requirement in ("aubeevil", "aubetiny==2.0"):
        (fn / "requirements.txt").write_text(f"{requirement}\n")
        with pytest.raises(BuildFailed) as caught:
            await deps.install_requirements(fn / "requirements.txt", tmp_path / "t3", data / "cache", log.append, 120)
        assert requirement.split("=")[0] in caught.value.message
        assert PASSWORD not in caught.value.message and str(data) not in caught.value.message
    assert not marker.exists(), "pip built the sdist"
    assert not any((data / "cache" / "builds").iterdir())


async def test_a_build_over_its_time_is_killed_with_everything_it_started(tmp_path: Path) -> None:
    sandbox = needs_root_and_bwrap()
    tag = f"aube-test-sleeper-{os.getpid()}"
    work, host = deps._prepare_area(sandbox, tmp_path / "cache", "")
    sleeper = f"import subprocess, time; subprocess.Popen(['sleep', '60', '{tag}']); time.sleep(60)"
    try:
        with anyio.fail_after(20):
            output = deps.BuildOutput(lambda _: None, {})
            status = await deps.run_sandboxed([sys.executable, "-I", "-c", sleeper], sandbox, host, output, 1.0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert status is None

    def left() -> list[str]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if tag.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                pass
        return found

    with anyio.fail_after(5):
        while left():
            await anyio.sleep(0.1)


async def test_without_bubblewrap_pip_still_runs_as_65534_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        pytest.skip("the drop to uid 65534 needs root")
    which = shutil.which
    monkeypatch.setattr(deps, "_SANDBOX", None)
    monkeypatch.setattr(deps.shutil, "which", lambda name: None if name == "bwrap" else which(name))
    secret_environment(monkeypatch, tmp_path / "data")
    if deps._open_to_others(sys.executable):
        assert deps.build_sandbox().bwrap is None
    else:
        # This host's interpreter lives where uid 65534 cannot go (a pyenv build under /root): a clear refusal.
        with pytest.raises(BuildFailed, match="not possible on this host"):
            deps.build_sandbox()

    # The same sandbox run for real with an interpreter uid 65534 can reach (the system's).
    python = which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3")
    sandbox = deps.Sandbox(as_root=True, bwrap=None, setpriv=which("setpriv"))
    work, host = deps._prepare_area(sandbox, tmp_path / "cache", "")
    try:
        code = (
            "import json, os; print(json.dumps([os.getuid(), os.getgroups(), os.environ['HOME'], sorted(os.environ)]))"
        )
        seen: list[str] = []
        output = deps.BuildOutput(seen.append, {str(work): "/build"})
        status = await deps.run_sandboxed([python, "-I", "-c", code], sandbox, host, output, 60)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert status == 0, seen
    uid, groups, home, keys = json.loads(seen[-1])
    assert (uid, groups, home) == (65534, [], "/build/home")
    assert not any(k.startswith("AUBE_") or k == "PYTHONPATH" for k in keys)
