"""The control plane against a real nats-server, real instances (processes or Docker containers), real clients.

Acceptance of the control-plane issue: uploads three ways on both runtimes, the three handler styles and the command
runtime, every bad input refused with nothing left behind, the max_instances cap under concurrent scale requests,
kill -9 and restart with nothing orphaned, delete removing everything.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import anyio
import pytest
from nats.aio.client import Client as NATS
from support import instance_ws, nats_client, zip_base64

from aube.controlplane.housekeeping import STALE_DRAINING_SECONDS
from aube.shared import instance_lifecycle as lifecycle
from aube.shared import names
from aube.shared.bus import request
from aube.shared.errors import AubeError, CapacityExhausted, InvalidBundle, InvalidName, UnknownFunction
from aube.shared.registry import Registry, Written
from aube.shared.schemas import (
    DeleteReply,
    DeleteRequest,
    InstanceRecord,
    ListReply,
    ListRequest,
    ScaleReply,
    ScaleRequest,
    UploadReply,
    UploadRequest,
)

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
UPLOAD_TIMEOUT = 300.0


def zip_files(files: dict[str, str]) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return base64.b64encode(buf.getvalue()).decode()


def tar_with(add: Callable[[tarfile.TarFile], None]) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("fn.py")
        data = b"def fn(websocket):\n    pass\n"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        add(tar)
    return base64.b64encode(buf.getvalue()).decode()


async def upload(nc: NATS, name: str, folder: Path) -> UploadReply:
    body = UploadRequest(name=name, zip=zip_base64(folder))
    return await request(nc, names.SUBJECT_UPLOAD, body, UploadReply, UPLOAD_TIMEOUT)


async def echo(instance: InstanceRecord, message: str) -> str:
    """One stream straight to an instance, presenting its credential as a proxy does."""
    async with instance_ws(instance.address, "/x", secret=instance.secret, open_timeout=30) as ws:
        await ws.send(message)
        reply = await ws.recv()
    assert isinstance(reply, str)
    return reply


async def free_instances(registry: Registry, name: str) -> list[InstanceRecord]:
    return [e.record for e in await registry.instances(name) if e.record.state == "free"]


def run_tool(platform: object, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AUBE_NATS_URL": platform.nats_url, "AUBE_PYTHON": sys.executable}  # type: ignore[attr-defined]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=UPLOAD_TIMEOUT, cwd=REPO)


async def test_aubefaas_function_uploaded_three_ways_reverses_messages(platform) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane()
    reverse = EXAMPLES / "reverse"
    assert "def fn(websocket)" in (reverse / "fn.py").read_text()
    assert "websockets>=12.0" in (reverse / "requirements.txt").read_text()

    script = run_tool(platform, str(REPO / "scripts" / "upload.sh"), str(reverse), "rev-script")
    assert script.returncode == 0, script.stderr
    assert script.stdout.strip().endswith("/rev-script")

    cli = run_tool(platform, sys.executable, "-m", "aube.cli", "deploy", str(reverse), "rev-cli")
    assert cli.returncode == 0, cli.stderr
    cli_reply = json.loads(cli.stdout)  # not a terminal: the reply as JSON
    assert cli_reply["url"].startswith("ws://") and cli_reply["url"].endswith("/rev-cli")

    async with nats_client(platform.nats_url) as (nc, registry):
        raw = await upload(nc, "rev-nats", reverse)
        assert raw.ok and raw.name == "rev-nats" and raw.version == 1 and raw.url.endswith("/rev-nats")
        for name in ("rev-script", "rev-cli", "rev-nats"):
            instances = await free_instances(registry, name)
            assert len(instances) == 1, name  # min_free defaults to 1
            assert await echo(instances[0], "hello aube") == "ebua olleh"

        listed = await request(nc, names.SUBJECT_LIST, ListRequest(), ListReply, 10)
        assert {f.name: (f.instances, f.free, f.busy) for f in listed.functions} == {
            "rev-cli": (1, 1, 0),
            "rev-nats": (1, 1, 0),
            "rev-script": (1, 1, 0),
        }


@pytest.mark.parametrize("example", ["reverse-async", "reverse-gen", "reverse-command"])
async def test_handler_styles_and_command_runtime(platform, example: str) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane()
    async with nats_client(platform.nats_url) as (nc, registry):
        await upload(nc, "styled", EXAMPLES / example)
        (instance,) = await free_instances(registry, "styled")
        assert await echo(instance, "stream") == "maerts"
        assert await echo(instance, "second stream, same instance") == "ecnatsni emas ,maerts dnoces"


async def test_events_report_progress_and_outcome(platform) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane()
    async with nats_client(platform.nats_url) as (nc, _registry):
        sub = await nc.subscribe(names.events_subject("evented"))
        await upload(nc, "evented", EXAMPLES / "reverse-async")
        kinds = []
        while not kinds or kinds[-1] != "ready":
            kinds.append(json.loads((await sub.next_msg(timeout=10)).data)["event"])
        assert kinds[0] == "accepted" and kinds[-1] == "ready"


def _link(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


def _device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info


BAD_UPLOADS: dict[str, tuple[dict[str, object], type[AubeError], str]] = {
    "invalid name": (
        {"name": "Bad_Name", "zip": zip_files({"fn.py": "def fn(ws): pass"})},
        InvalidName,
        "invalid_name",
    ),
    "corrupt archive": (
        {"name": "f", "zip": base64.b64encode(b"PK\x03\x04garbage").decode()},
        InvalidBundle,
        "bundle_corrupt",
    ),
    "not base64": ({"name": "f", "zip": "***"}, InvalidBundle, "bundle_corrupt"),
    "absolute path": (
        {"name": "f", "zip": zip_files({"fn.py": "def fn(ws): pass", "/etc/evil": "x"})},
        InvalidBundle,
        "bundle_unsafe_path",
    ),
    "dot-dot": (
        {"name": "f", "zip": zip_files({"fn.py": "def fn(ws): pass", "../evil": "x"})},
        InvalidBundle,
        "bundle_unsafe_path",
    ),
    "escaping link": (
        {"name": "f", "tar": tar_with(lambda t: t.addfile(_link("out", "../../etc/passwd")))},
        InvalidBundle,
        "bundle_link",
    ),
    "device file": (
        {"name": "f", "tar": tar_with(lambda t: t.addfile(_device("dev")))},
        InvalidBundle,
        "bundle_device_file",
    ),
    "too many files": (
        {"name": "f", "zip": zip_files({"fn.py": "def fn(ws): pass", **{f"f{i}.txt": "" for i in range(40)}})},
        InvalidBundle,
        "bundle_too_many_files",
    ),
    "too large": (
        {"name": "f", "zip": zip_files({"fn.py": "def fn(ws): pass", "big": "x" * 300_000})},
        InvalidBundle,
        "bundle_too_large",
    ),
    "no fn.py": ({"name": "f", "zip": zip_files({"main.py": "print(1)"})}, InvalidBundle, "bundle_missing_fn"),
    "fn.py does not compile": (
        {"name": "f", "zip": zip_files({"fn.py": "def fn(:\n"})},
        InvalidBundle,
        "bundle_fn_syntax",
    ),
    "no fn defined": (
        {"name": "f", "zip": zip_files({"fn.py": "def handler(ws): pass\n"})},
        InvalidBundle,
        "bundle_fn_undefined",
    ),
    "invalid aube.toml": (
        {"name": "f", "zip": zip_files({"fn.py": "def fn(ws): pass", "aube.toml": "[scaling]\nmax_instances = 0\n"})},
        InvalidBundle,
        "bundle_invalid_manifest",
    ),
    "aube.toml not toml": (
        {"name": "f", "zip": zip_files({"fn.py": "def fn(ws): pass", "aube.toml": "[scaling\n"})},
        InvalidBundle,
        "bundle_invalid_manifest",
    ),
}


async def assert_nothing_left(platform, registry: Registry) -> None:  # type: ignore[no-untyped-def]
    """No registry entry, no function record, no instance and no prepared version for this test's owner."""
    assert await registry.instances() == []
    assert await registry.functions() == []
    runtime = await _runtime(platform)
    try:
        assert await runtime.instances(platform.owner) == []
        assert await runtime.artifacts(platform.owner) == []
    finally:
        await runtime.close()


async def _runtime(platform):  # type: ignore[no-untyped-def]
    from aube.shared.settings import ControlPlaneSettings

    settings = ControlPlaneSettings(
        owner=platform.owner,
        data_dir=platform.data_dir,
        runtime=platform.runtime,
        instance_network=platform.network,
        instance_bridge=platform.bridge,
    )
    if platform.runtime == "docker":
        from aube.controlplane.runtimes.docker import DockerRuntime

        return await DockerRuntime.connect(settings)
    from aube.controlplane.runtimes.process import ProcessRuntime

    return ProcessRuntime(settings)


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_every_bad_input_is_refused_by_name_and_leaves_nothing(platform) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane(AUBE_MAX_FILES="30", AUBE_MAX_EXTRACTED_BYTES="200000")
    async with nats_client(platform.nats_url) as (nc, registry):
        for case, (body, error, code) in BAD_UPLOADS.items():
            msg = await nc.request(names.SUBJECT_UPLOAD, json.dumps(body).encode(), timeout=30)
            reply = json.loads(msg.data)
            assert reply["ok"] is False, case
            assert reply["error"]["code"] == code, (case, reply)
            assert reply["error"]["message"], case
            with pytest.raises(error):
                await request(nc, names.SUBJECT_UPLOAD, UploadRequest(**body), UploadReply, 30)  # type: ignore[arg-type]
        # Malformed requests get an error reply too, never silence.
        for raw in (b"not json", b'{"zip": "x"}', b'{"name": "f"}', b'{"name": "f", "zip": "", "tar": ""}'):
            reply = json.loads((await nc.request(names.SUBJECT_UPLOAD, raw, timeout=10)).data)
            assert reply["ok"] is False and reply["error"]["code"] in ("invalid_request", "bundle_corrupt"), raw
        await assert_nothing_left(platform, registry)
        # ...and it keeps serving.
        assert (await upload(nc, "after-errors", EXAMPLES / "reverse-async")).ok


async def test_build_and_health_failures_are_replied_and_cleaned_up(platform, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane(AUBE_HEALTH_TIMEOUT="8")
    broken_requirements = tmp_path / "broken-reqs"
    broken_requirements.mkdir()
    (broken_requirements / "fn.py").write_text("def fn(websocket):\n    pass\n")
    (broken_requirements / "requirements.txt").write_text("aube-no-such-package-exists-7d1c==1.0\n")
    crashing = tmp_path / "crashing"
    crashing.mkdir()
    (crashing / "fn.py").write_text("import sys\nsys.exit(3)\ndef fn(websocket):\n    pass\n")
    hanging = tmp_path / "hanging"
    hanging.mkdir()
    (hanging / "fn.py").write_text("import time\ntime.sleep(3600)\ndef fn(websocket):\n    pass\n")
    async with nats_client(platform.nats_url) as (nc, registry):
        with pytest.raises(AubeError) as build:
            await upload(nc, "broken", broken_requirements)
        assert build.value.code == "build_failed"
        assert "aube-no-such-package-exists-7d1c" in build.value.message
        with pytest.raises(AubeError) as crash:
            await upload(nc, "crashing", crashing)
        # Dying at once is a start failure or a failed health check, depending on how fast it dies.
        assert crash.value.code in ("runtime_failure", "health_check_failed")
        assert "3" in crash.value.message
        with pytest.raises(AubeError) as health:
            await upload(nc, "hanging", hanging)
        assert health.value.code == "health_check_failed"
        await assert_nothing_left(platform, registry)


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_concurrent_scale_requests_never_exceed_max_instances(platform, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fn = tmp_path / "capped"
    fn.mkdir()
    (fn / "fn.py").write_text((EXAMPLES / "reverse-async" / "fn.py").read_text())
    (fn / "aube.toml").write_text("[scaling]\nmin_free = 1\nmax_instances = 3\n")
    await platform.start_controlplane()
    async with nats_client(platform.nats_url) as (nc, registry):
        await upload(nc, "capped", fn)
        outcomes: list[object] = []

        async def scale() -> None:
            try:
                outcomes.append(
                    await request(nc, names.SUBJECT_SCALE, ScaleRequest(name="capped", count=1), ScaleReply, 120)
                )
            except CapacityExhausted as e:
                outcomes.append(e)

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(scale)
        entries = await registry.instances("capped")
        assert len(entries) == 3
        assert sorted(e.record.slot for e in entries) == [0, 1, 2]
        started = [o for o in outcomes if isinstance(o, ScaleReply)]
        assert sum(len(o.started) for o in started) == 2  # one warm instance already existed
        assert sum(isinstance(o, CapacityExhausted) for o in outcomes) == 3
        runtime = await _runtime(platform)
        assert len(await runtime.instances(platform.owner)) == 3
        await runtime.close()
        for instance in await free_instances(registry, "capped"):
            assert await echo(instance, "ab") == "ba"


async def test_kill_9_and_restart_leaves_registry_and_runtime_in_agreement(platform, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    slow = tmp_path / "slow"
    slow.mkdir()
    # Slow to become healthy, so a kill -9 can land while an instance is still "starting".
    (slow / "fn.py").write_text(
        "import time\ntime.sleep(4)\nasync def fn(websocket):\n    await websocket.send('up')\n"
    )
    (slow / "aube.toml").write_text("[scaling]\nmin_free = 1\nmax_instances = 4\n")
    cp = await platform.start_controlplane()
    async with nats_client(platform.nats_url) as (nc, registry):
        await upload(nc, "steady", EXAMPLES / "reverse-async")
        await upload(nc, "slow", slow)
        (steady,) = await free_instances(registry, "steady")
        await nc.publish(names.SUBJECT_SCALE, b'{"name": "slow", "count": 2}')
        with anyio.fail_after(60):
            while not any(e.record.state == "starting" for e in await registry.instances("slow")):
                await anyio.sleep(0.05)
        cp.kill9()

        # The instance that was serving keeps serving while no control plane runs.
        assert await echo(steady, "still here") == "ereh llits"

        restarted = await platform.start_controlplane()
        runtime = await _runtime(platform)
        try:
            with anyio.fail_after(60):
                while True:
                    entries = await registry.instances()
                    running = await runtime.instances(platform.owner)
                    if {e.record.instance_id for e in entries} == {r.instance_id for r in running} and all(
                        e.record.state == "free" for e in entries
                    ):
                        break
                    await anyio.sleep(0.2)
        finally:
            await runtime.close()
        assert {e.record.function for e in entries} == {"steady", "slow"}
        assert await echo(steady, "after restart") == "tratser retfa"
        assert restarted.proc is not None and restarted.proc.poll() is None


async def test_delete_removes_instances_image_and_entries(platform) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane()
    async with nats_client(platform.nats_url) as (nc, registry):
        await upload(nc, "doomed", EXAMPLES / "reverse")
        await request(nc, names.SUBJECT_SCALE, ScaleRequest(name="doomed", count=1), ScaleReply, 120)
        assert len(await registry.instances("doomed")) == 2
        reply = await request(nc, names.SUBJECT_DELETE, DeleteRequest(name="doomed"), DeleteReply, 60)
        assert reply.stopped == 2 and reply.draining == 0
        await assert_nothing_left(platform, registry)
        with pytest.raises(UnknownFunction):
            await request(nc, names.SUBJECT_DELETE, DeleteRequest(name="doomed"), DeleteReply, 10)
        deleted = run_tool(platform, str(REPO / "scripts" / "delete.sh"), "never-uploaded")
        assert deleted.returncode != 0 and "unknown_function" in deleted.stderr


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_reupload_is_a_new_version_and_an_open_stream_is_not_cut(platform) -> None:  # type: ignore[no-untyped-def]
    import msgspec

    await platform.start_controlplane()
    async with nats_client(platform.nats_url) as (nc, registry):
        first = await upload(nc, "evolving", EXAMPLES / "reverse-async")
        (entry,) = await registry.instances("evolving")
        # Hold a stream on v1 the way a proxy does: claim the entry (free -> busy), then stream.
        claimed = msgspec.structs.replace(entry.record, state="busy", claimed_by="test-proxy")
        assert await registry.update_instance(entry.revision, claimed) is not None
        async with instance_ws(entry.record.address, "/evolving", secret=entry.record.secret) as ws:
            second = await upload(nc, "evolving", EXAMPLES / "reverse-gen")
            assert second.version == first.version + 1
            await ws.send("old stream")
            assert await ws.recv() == "maerts dlo"
            old = await registry.get_instance(entry.key)
            assert old is not None and old.record.retire and old.record.state == "busy"
            new = [e for e in await registry.instances("evolving") if e.record.version == second.version]
            assert [e.record.state for e in new] == ["free"]
        # The stream ended: release it as the proxy would; retirement then stops the old instance.
        old = await registry.get_instance(entry.key)
        assert old is not None
        released = msgspec.structs.replace(old.record, state="free", claimed_by=None)
        assert await registry.update_instance(old.revision, released) is not None
        with anyio.fail_after(30):
            while any(e.record.version == first.version for e in await registry.instances("evolving")):
                await anyio.sleep(0.1)


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_delete_lets_a_busy_stream_finish_within_the_grace(platform) -> None:  # type: ignore[no-untyped-def]
    import msgspec

    await platform.start_controlplane()
    async with nats_client(platform.nats_url) as (nc, registry):
        await upload(nc, "graceful", EXAMPLES / "reverse-async")
        (entry,) = await registry.instances("graceful")
        claimed = msgspec.structs.replace(entry.record, state="busy", claimed_by="test-proxy")
        assert await registry.update_instance(entry.revision, claimed) is not None
        async with instance_ws(entry.record.address, "/graceful", secret=entry.record.secret) as ws:
            reply = await request(nc, names.SUBJECT_DELETE, DeleteRequest(name="graceful", grace=2.0), DeleteReply, 30)
            assert (reply.stopped, reply.draining) == (0, 1)
            await ws.send("within grace")
            assert await ws.recv() == "ecarg nihtiw"
            # After the grace the instance is stopped, which ends the stream.
            with anyio.fail_after(30):
                await ws.wait_closed()
        with anyio.fail_after(30):
            while await registry.instances() or await registry.functions():
                await anyio.sleep(0.1)
        await assert_nothing_left(platform, registry)


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_reupload_of_a_single_instance_function_takes_the_free_slot(platform, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fn = tmp_path / "single"
    fn.mkdir()
    (fn / "fn.py").write_text((EXAMPLES / "reverse-async" / "fn.py").read_text())
    (fn / "aube.toml").write_text("[scaling]\nmax_instances = 1\n")
    await platform.start_controlplane()
    async with nats_client(platform.nats_url) as (nc, registry):
        first = await upload(nc, "single", fn)
        second = await upload(nc, "single", fn)
        assert second.version == first.version + 1
        (entry,) = await registry.instances("single")
        assert (entry.record.version, entry.record.state) == (second.version, "free")
        assert await echo(entry.record, "one slot") == "tols eno"


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_an_instance_whose_stop_request_was_lost_is_stopped_by_its_control_plane(  # type: ignore[no-untyped-def]
    platform, tmp_path: Path
) -> None:
    """Lost-stop recovery has one owner: a reaper (or proxy) drained the entry and its stop request never arrived;
    the control plane that owns the instance stops it once the entry has stayed draining too long."""
    folder = tmp_path / "lost"
    folder.mkdir()
    (folder / "fn.py").write_text((EXAMPLES / "reverse-async" / "fn.py").read_text())
    (folder / "aube.toml").write_text("[scaling]\nmin_free = 2\nmax_instances = 4\n")
    await platform.start_controlplane()
    async with nats_client(platform.nats_url) as (nc, registry):
        await upload(nc, "lost", folder)
        victim = (await registry.instances("lost"))[0]
        outcome = await registry.apply(victim.key, partial(lifecycle.drain), entry=victim)
        assert isinstance(outcome, Written)  # drained, and no stop request sent: as if it was lost
        drained_at = time.monotonic()
        runtime = await _runtime(platform)
        try:
            with anyio.fail_after(STALE_DRAINING_SECONDS + 45):
                while True:
                    entry = await registry.get_instance(victim.key)
                    running = {r.instance_id for r in await runtime.instances(platform.owner) if r.alive}
                    if (entry is None or entry.record.instance_id != victim.record.instance_id) and (
                        victim.record.instance_id not in running
                    ):
                        break
                    await anyio.sleep(0.2)
        finally:
            await runtime.close()
        print(f"lost stop recovered after {time.monotonic() - drained_at:.1f}s")
        # The warm pool is kept meanwhile.
        with anyio.fail_after(60):
            while len(await free_instances(registry, "lost")) < 2:
                await anyio.sleep(0.2)
