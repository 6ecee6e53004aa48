"""Uploads a hostile deployer sends, against a real control plane process on a real nats-server (process runtime).

Findings 8 and 9 of the security issue, then what an attacker would try next: manifest values outside the
operator's ranges and reserved environment names; an object whose meta lies about its size (bounded memory, other
requests keep being answered); a 900-deep folder; many tiny files, compression bombs, looping links, a sparse
1 TiB file; objects in thousands of tiny chunks, with a wildcard nuid or linking elsewhere. Every refusal names
its problem, leaves nothing behind (the object is gone from the store, no upload folder remains) and the control
plane keeps serving.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import subprocess
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Any

import anyio
import pytest
from harness import proc_status_kib
from nats.aio.client import Client as NATS
from nats.js import api
from support import nats_client

from aube.shared import names
from aube.shared.bus import request
from aube.shared.schemas import ListReply, ListRequest, UploadReply, UploadRequest

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)]

REPO = Path(__file__).resolve().parents[2]
FN = "def fn(websocket):\n    for m in websocket:\n        websocket.send(m)\n"
STREAM = f"OBJ_{names.BUCKET_BUNDLES}"
MIB = 1024 * 1024


def zip_b64(files: dict[str, str | bytes], compression: int = zipfile.ZIP_STORED) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return base64.b64encode(buf.getvalue()).decode()


async def upload_reply(nc: NATS, body: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    msg = await nc.request(names.SUBJECT_UPLOAD, json.dumps(body).encode(), timeout=timeout)
    reply: dict[str, Any] = json.loads(msg.data)
    return reply


def error_of(reply: dict[str, Any]) -> tuple[str, str]:
    assert reply["ok"] is False, reply
    return reply["error"]["code"], reply["error"]["message"]


def uploads_left(platform: Any) -> list[str]:
    folder = Path(platform.data_dir) / "uploads"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


async def store_messages(nc: NATS) -> int:
    return (await nc.jetstream().stream_info(STREAM)).state.messages


async def forge_meta(nc: NATS, key: str, **changes: Any) -> None:
    """Rewrite an object's meta the way nats-py writes it (JSON on $O.<bucket>.M.<base64 key>, rolled up)."""
    js = nc.jetstream()
    subject = f"$O.{names.BUCKET_BUNDLES}.M.{base64.urlsafe_b64encode(key.encode()).decode()}"
    info = json.loads((await js.get_msg(STREAM, subject=subject)).data or b"{}")
    info.update(changes)
    await js.publish(subject, json.dumps(info).encode(), headers={api.Header.ROLLUP: "sub"})


# ---------------------------------------------------------------------------------------------------------------
# Finding 8: manifest values outside the operator's ranges, reserved environment names.

OUT_OF_RANGE = [
    ("[limits]\ncpus = 1e-12\n", "limits.cpus", "0.01..1"),
    ("[limits]\ncpus = 1.5\n", "limits.cpus", "0.01..1"),
    ('[limits]\nmemory = "100000g"\n', "limits.memory", "6m..4g"),
    ('[limits]\nmemory = "5m"\n', "limits.memory", "6m..4g"),
    ("[limits]\npids = 4000000\n", "limits.pids", "8..4096"),
    ("[limits]\npids = 2\n", "limits.pids", "8..4096"),
    ("[scaling]\nmax_instances = 100000\n", "scaling.max_instances", "1..3"),
    ("[scaling]\nmax_instances = 0\n", "scaling.max_instances", "1..3"),
    ("[scaling]\nmin_free = 11\n", "scaling.min_free", "0..10"),
    ("[scaling]\nmin_free = -1\n", "scaling.min_free", "0..10"),
    ("[scaling]\nidle_timeout = 100000\n", "scaling.idle_timeout", "1..86400"),
    ("[scaling]\nidle_timeout = 0\n", "scaling.idle_timeout", "1..86400"),
    ("[limits]\nstream_idle_timeout = 601\nstream_max_duration = 1\n", "limits.stream_idle_timeout", "0..600"),
    ("[limits]\nstream_idle_timeout = -1\nstream_max_duration = 1\n", "limits.stream_idle_timeout", "0..600"),
    ("[limits]\nstream_idle_timeout = 0\nstream_max_duration = 1\n", "limits.stream_idle_timeout 0 (never)", "0..600"),
    ("[limits]\nstream_max_duration = 3601\nstream_idle_timeout = 1\n", "limits.stream_max_duration", "0..3600"),
    ("[limits]\nstream_max_duration = -1\nstream_idle_timeout = 1\n", "limits.stream_max_duration", "0..3600"),
]
RESERVED_ENV = ["AUBE_FN_DIR", "LD_PRELOAD", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PATH", "GLIBC_TUNABLES"]


async def test_manifest_limits_outside_the_operator_ranges_are_refused_naming_key_and_range(platform) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane(
        AUBE_CPUS_MAX="1",
        AUBE_MAX_INSTANCES_MAX="3",
        AUBE_STREAM_IDLE_TIMEOUT_MAX="600",
        AUBE_STREAM_MAX_DURATION_MAX="3600",
    )
    async with nats_client(platform.nats_url) as (nc, registry):
        for toml, key, allowed in OUT_OF_RANGE:
            body = {"name": "greedy", "zip": zip_b64({"fn.py": FN, "aube.toml": toml})}
            code, message = error_of(await upload_reply(nc, body))
            assert code == "bundle_invalid_manifest", (toml, message)
            assert key in message and allowed in message, (toml, message)
        for name in RESERVED_ENV:
            body = {"name": "greedy", "zip": zip_b64({"fn.py": FN, "aube.toml": f'[env]\n{name} = "/tmp/x"\n'})}
            code, message = error_of(await upload_reply(nc, body))
            assert code == "bundle_invalid_manifest" and f"env key {name} is reserved" in message, message
        assert await registry.functions() == []
        assert uploads_left(platform) == []


# ---------------------------------------------------------------------------------------------------------------
# Finding 9: an object whose meta lies, a 900-deep folder.


async def test_object_with_a_lying_size_is_refused_in_bounded_memory_while_others_are_answered(platform) -> None:  # type: ignore[no-untyped-def]
    service = await platform.start_controlplane(AUBE_MAX_BUNDLE_BYTES=str(MIB))
    pid = service.proc.pid
    async with nats_client(platform.nats_url) as (nc, _):
        store = await nc.jetstream().object_store(names.BUCKET_BUNDLES)
        await store.put("liar", os.urandom(20 * MIB))  # 160 chunks of 128 KiB, as nats clients write them
        await forge_meta(nc, "liar", size=1000)
        await request(nc, names.SUBJECT_LIST, ListRequest(), ListReply, 10)  # warm
        rss_before, peak_before = proc_status_kib(pid, "VmRSS"), proc_status_kib(pid, "VmHWM")
        slowest = 0.0
        reply: dict[str, Any] = {}

        async def send() -> None:
            nonlocal reply
            reply = await upload_reply(nc, {"name": "liar", "object": "liar"})

        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            while not reply:
                started = time.monotonic()
                await request(nc, names.SUBJECT_LIST, ListRequest(), ListReply, 30)
                slowest = max(slowest, time.monotonic() - started)
                await anyio.sleep(0.02)
        rss_after, peak_after = proc_status_kib(pid, "VmRSS"), proc_status_kib(pid, "VmHWM")
        code, message = error_of(reply)
        assert code == "bundle_too_large", message
        print(
            f"control plane RSS {rss_before} -> {rss_after} KiB, peak {peak_before} -> {peak_after} KiB;"
            f" slowest concurrent list {slowest * 1000:.0f} ms"
        )
        # Bounded: the 20 MiB object never sits in memory (nats-py's get held it whole, and copied it per chunk).
        assert peak_after - peak_before < 12 * 1024, (peak_before, peak_after)
        assert slowest < 1.0
        # Nothing left behind: the object is gone from the store, no upload folder remains.
        assert await store_messages(nc) == 0
        assert uploads_left(platform) == []
        assert "Traceback" not in service.log_text()


async def test_folder_900_deep_is_bundle_too_deep_and_logs_no_traceback(platform) -> None:  # type: ignore[no-untyped-def]
    service = await platform.start_controlplane()
    deep = "/".join(["d"] * 900)
    async with nats_client(platform.nats_url) as (nc, registry):
        for body in (
            {"name": "deep", "zip": zip_b64({"fn.py": FN, f"{deep}/x.txt": "x"})},
            {"name": "deep", "tar": _tar_b64({"fn.py": FN.encode(), f"{deep}/x.txt": b"x"})},
        ):
            code, message = error_of(await upload_reply(nc, body))
            assert code == "bundle_too_deep", message
            assert len(message) < 400
        assert await registry.functions() == []
        assert uploads_left(platform) == []
    log = service.log_text()
    assert "Traceback" not in log and "RecursionError" not in log
    assert len(log.splitlines()) < 200


def _tar_b64(files: dict[str, bytes]) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return base64.b64encode(buf.getvalue()).decode()


# ---------------------------------------------------------------------------------------------------------------
# What an attacker tries next.


def _loop_links_tar() -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = FN.encode()
        info = tarfile.TarInfo("fn.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for name, target in (("a", "b"), ("b", "a")):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.SYMTYPE, target
            tar.addfile(link)
    return base64.b64encode(buf.getvalue()).decode()


def _through_link_tar() -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        link = tarfile.TarInfo("self")
        link.type, link.linkname = tarfile.SYMTYPE, "."
        tar.addfile(link)
        data = FN.encode()
        for name in ("fn.py", "self/self/self/x.py"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return base64.b64encode(buf.getvalue()).decode()


def _sparse_tar(tmp: Path) -> str:
    """GNU tar's sparse member: a 1 TiB file that is all holes, 176 bytes compressed."""
    folder = tmp / "sparse"
    folder.mkdir()
    (folder / "fn.py").write_text(FN)
    with (folder / "huge").open("wb") as f:
        f.truncate(1 << 40)
    out = tmp / "sparse.tgz"
    subprocess.run(["tar", "--sparse", "-czf", str(out), "-C", str(folder), "fn.py", "huge"], check=True)
    (folder / "huge").unlink()
    return base64.b64encode(out.read_bytes()).decode()


def _huge_pax_record_tar() -> str:
    """fn.py, then a pax record of 200 MiB in ~200 KiB: tarfile reads such a record whole while listing."""
    body = b" comment=" + b"a" * (200 * MIB) + b"\n"
    length = len(body) + len(str(len(body)))
    record = str(len(body) + len(str(length))).encode() + body
    out = b""
    for info, payload in ((tarfile.TarInfo("fn.py"), FN.encode()), (tarfile.TarInfo("././@PaxHeader"), record)):
        info.size = len(payload)
        if info.name.endswith("PaxHeader"):
            info.type = tarfile.XHDTYPE
        out += info.tobuf(format=tarfile.USTAR_FORMAT) + payload + bytes(-len(payload) % 512)
    x = tarfile.TarInfo("x.txt")
    x.size = 1
    out += x.tobuf(format=tarfile.USTAR_FORMAT) + b"x" + bytes(511) + bytes(1024)
    return base64.b64encode(gzip.compress(out)).decode()


async def test_next_attacks_on_archives_are_refused_in_bounded_memory(platform, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    service = await platform.start_controlplane(AUBE_MAX_FILES="500", AUBE_MAX_EXTRACTED_BYTES=str(256 * MIB))
    many = {f"f{i}": b"" for i in range(5000)}
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("many small files", {"zip": zip_b64({"fn.py": FN, **many})}, "bundle_too_many_files"),
        (
            "zip bomb, 1 GiB of zeros in ~1 MiB",
            {"zip": zip_b64({"fn.py": FN, "zeros": bytes(1024 * MIB)}, zipfile.ZIP_DEFLATED)},
            "bundle_too_large",
        ),
        ("looping links", {"tar": _loop_links_tar()}, "bundle_link"),
        ("files through a link to the folder itself", {"tar": _through_link_tar()}, "bundle_link"),
        ("sparse 1 TiB file", {"tar": _sparse_tar(tmp_path)}, "bundle_too_large"),
        ("200 MiB pax record", {"tar": _huge_pax_record_tar()}, "bundle_corrupt"),
        ("deeply nested aube.toml", {"zip": zip_b64({"fn.py": FN, "aube.toml": "a = " + "[" * 20000})}, ""),
        ("fn.py nesting past the compiler", {"zip": zip_b64({"fn.py": "x = " + "+".join(["1"] * 60_000)})}, ""),
        ("fn.py too big to compile", {"zip": zip_b64({"fn.py": FN + "x = 1\n" * 100_000})}, "bundle_too_large"),
    ]
    pid = service.proc.pid
    peak_before = proc_status_kib(pid, "VmHWM")
    async with nats_client(platform.nats_url) as (nc, registry):
        for case, body, expected in cases:
            code, message = error_of(await upload_reply(nc, {"name": "attack", **body}))
            if expected:
                assert code == expected, (case, message)
            else:
                assert code in ("bundle_invalid_manifest", "bundle_fn_syntax"), (case, message)
        print(f"control plane peak RSS {peak_before} -> {proc_status_kib(pid, 'VmHWM')} KiB over the archive attacks")
        assert proc_status_kib(pid, "VmHWM") - peak_before < 64 * 1024
        assert await registry.functions() == []
        assert uploads_left(platform) == []
        await request(nc, names.SUBJECT_LIST, ListRequest(), ListReply, 10)
    log = service.log_text()
    assert "Traceback" not in log and "(internal)" not in log


async def test_next_attacks_on_objects_are_refused_and_removed(platform) -> None:  # type: ignore[no-untyped-def]
    service = await platform.start_controlplane(AUBE_MAX_BUNDLE_BYTES=str(MIB))
    async with nats_client(platform.nats_url) as (nc, registry):
        js = nc.jetstream()
        store = await js.object_store(names.BUCKET_BUNDLES)
        tiny = api.ObjectMeta(name="tiny", options=api.ObjectMetaOptions(max_chunk_size=64))

        # Thousands of tiny chunks: refused from the meta's chunk count, and again while reading when it lies.
        await store.put("tiny", os.urandom(3000 * 64), meta=tiny)
        code, message = error_of(await upload_reply(nc, {"name": "chunks", "object": "tiny"}))
        assert code == "bundle_too_large" and "chunks" in message, message
        await store.put("tiny", os.urandom(3000 * 64), meta=tiny)
        await forge_meta(nc, "tiny", chunks=1)
        started = time.monotonic()
        code, message = error_of(await upload_reply(nc, {"name": "chunks", "object": "tiny"}))
        assert code == "bundle_too_large" and "chunks" in message, message
        assert time.monotonic() - started < 10

        # A meta claiming more than the limit is refused before any chunk is read.
        await store.put("big", os.urandom(2 * MIB))
        code, message = error_of(await upload_reply(nc, {"name": "big", "object": "big"}))
        assert code == "bundle_too_large" and str(2 * MIB) in message, message

        # A wildcard nuid would read (and purge) every object's chunks: refused, the bystander untouched.
        await store.put("bystander", b"keep me")
        await store.put("wild", b"x" * 100)
        await forge_meta(nc, "wild", nuid=">")
        code, _ = error_of(await upload_reply(nc, {"name": "wild", "object": "wild"}))
        assert code == "bundle_corrupt"
        assert (await store.get("bystander")).data == b"keep me"

        # A link to another bucket (nats-py's get would follow it) and a digest that does not match.
        await store.put("linked", b"x")
        await forge_meta(nc, "linked", options={"link": {"bucket": "another-tenant", "name": "secret"}})
        assert error_of(await upload_reply(nc, {"name": "linked", "object": "linked"}))[0] == "invalid_request"
        await store.put("tampered", base64.b64decode(zip_b64({"fn.py": FN})))
        await forge_meta(nc, "tampered", digest="SHA-256=" + base64.urlsafe_b64encode(bytes(32)).decode())
        code, message = error_of(await upload_reply(nc, {"name": "tampered", "object": "tampered"}))
        assert code == "bundle_corrupt" and "digest" in message, message

        # Meta that is not JSON, a key that does not exist.
        await js.publish(f"$O.{names.BUCKET_BUNDLES}.M.{base64.urlsafe_b64encode(b'junk').decode()}", b"{not json")
        assert error_of(await upload_reply(nc, {"name": "junk", "object": "junk"}))[0] == "bundle_corrupt"
        assert error_of(await upload_reply(nc, {"name": "nothing", "object": "nothing"}))[0] == "invalid_request"

        # Everything refused is gone from the store, except the bystander, which nobody uploaded.
        assert [info.name for info in await store.list(ignore_deletes=True)] == ["bystander"]
        assert await registry.functions() == []
        assert uploads_left(platform) == []
    assert "Traceback" not in service.log_text()


async def test_object_upload_deploys_and_removes_the_object(platform) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane()
    async with nats_client(platform.nats_url) as (nc, _):
        store = await nc.jetstream().object_store(names.BUCKET_BUNDLES)
        await store.put("good", base64.b64decode(zip_b64({"fn.py": FN, "pad.bin": os.urandom(3 * MIB)})))
        reply = await request(nc, names.SUBJECT_UPLOAD, UploadRequest(name="good", object="good"), UploadReply, 300)
        assert reply.ok and reply.instances == 1
        assert await store_messages(nc) == 0
        assert uploads_left(platform) == []


async def test_a_burst_of_uploads_beyond_the_waiting_limit_is_refused_at_once(platform) -> None:  # type: ignore[no-untyped-def]
    """Every waiting upload holds its request body (up to the 8 MiB NATS payload): past AUBE_MAX_WAITING_UPLOADS
    waiting, an upload is refused at once with capacity_exhausted instead of piling up in memory."""
    service = await platform.start_controlplane(AUBE_MAX_WAITING_UPLOADS="2", AUBE_MAX_PARALLEL_UPLOADS="2")
    # Slow to extract (200 MiB of zeros written to disk), then refused by its manifest: nothing is deployed.
    zeros = {"fn.py": FN, "aube.toml": "[limits]\npids = 1\n", "zeros": bytes(200 * MIB)}
    body = {"zip": zip_b64(zeros, zipfile.ZIP_DEFLATED)}
    async with nats_client(platform.nats_url) as (nc, registry):
        codes: list[str] = []

        async def send(i: int) -> None:
            codes.append(error_of(await upload_reply(nc, {"name": f"burst-{i}", **body}, timeout=120))[0])

        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(send, i)
        print(f"burst of 12 uploads: {sorted(codes)}")
        assert len(codes) == 12  # every one answered
        assert set(codes) == {"bundle_invalid_manifest", "capacity_exhausted"}
        assert codes.count("bundle_invalid_manifest") >= 4  # two at work, two waiting, all served
        assert await registry.functions() == []
        assert uploads_left(platform) == []
        await request(nc, names.SUBJECT_LIST, ListRequest(), ListReply, 10)
    assert "Traceback" not in service.log_text()
