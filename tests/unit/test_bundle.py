"""Bundle safety: malicious zips and tarballs built in memory are refused with the right code, and nothing
is ever written outside the destination folder."""

from __future__ import annotations

import base64
import gzip
import io
import os
import stat
import struct
import tarfile
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import msgspec
import pytest

from aube.controlplane import bundle
from aube.controlplane.bundle import (
    BundleLimits,
    MemberInfo,
    check_members,
    decode_base64,
    extract_archive,
    function_root,
    sniff_archive,
    validate_bundle,
)
from aube.shared.errors import InvalidBundle
from aube.shared.schemas import Manifest

FN = b"def fn(websocket):\n    for message in websocket:\n        websocket.send(message)\n"
LIMITS = BundleLimits(max_compressed_bytes=1 << 20, max_extracted_bytes=1 << 20, max_files=20)

Kind = Literal["file", "dir", "symlink", "hardlink", "chr", "fifo", "socket"]
# (name, kind, data or link target, mode)
Entry = tuple[str, Kind, bytes | str, int]
Fmt = Literal["zip", "tar.gz"]


def f(name: str, data: bytes = b"x", mode: int = 0o644) -> Entry:
    return (name, "file", data, mode)


def d(name: str) -> Entry:
    return (name, "dir", b"", 0o755)


def link(name: str, target: str) -> Entry:
    return (name, "symlink", target, 0o777)


_ZIP_TYPES = {"file": stat.S_IFREG, "chr": stat.S_IFCHR, "fifo": stat.S_IFIFO, "socket": stat.S_IFSOCK}


def make_zip(entries: Sequence[Entry]) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        warnings.simplefilter("ignore")  # duplicate names are one of the attacks
        for name, kind, payload, mode in entries:
            info = zipfile.ZipInfo(name + ("/" if kind == "dir" and not name.endswith("/") else ""))
            info.create_system = 3
            if kind == "dir":
                info.external_attr = (stat.S_IFDIR | mode) << 16 | 0x10
                archive.writestr(info, b"")
            elif kind == "symlink":
                info.external_attr = (stat.S_IFLNK | mode) << 16
                archive.writestr(info, str(payload).encode())
            else:
                info.external_attr = (_ZIP_TYPES[kind] | mode) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, payload if isinstance(payload, bytes) else payload.encode())
    return buffer.getvalue()


_TAR_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def make_tar(entries: Sequence[Entry], *, gz: bool = True) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as archive:
        for name, kind, payload, mode in entries:
            info = tarfile.TarInfo(name)
            info.type = _TAR_TYPES[kind]
            info.mode = mode
            if kind in ("symlink", "hardlink"):
                info.linkname = str(payload)
                archive.addfile(info)
            elif kind == "file":
                data = payload if isinstance(payload, bytes) else payload.encode()
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                archive.addfile(info)
    return buffer.getvalue()


def make(fmt: Fmt, entries: Sequence[Entry]) -> bytes:
    return make_zip(entries) if fmt == "zip" else make_tar(entries)


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "dest"


def outside(tmp_path: Path) -> set[str]:
    """Everything in tmp_path apart from dest: must stay empty in every escape case."""
    return {p.name for p in tmp_path.iterdir()} - {"dest"}


def refused(data: bytes, dest: Path, code: str, limits: BundleLimits = LIMITS) -> InvalidBundle:
    with pytest.raises(InvalidBundle) as caught:
        validate_bundle(data, dest, limits)
    assert caught.value.code == code, caught.value.message
    assert not dest.exists() or not any(dest.iterdir()), "dest must be left empty"
    return caught.value


FORMATS: list[Fmt] = ["zip", "tar.gz"]


# --------------------------------------------------------------------------------------------------------
# Good bundles.


def test_aubefaas_zip(dest: Path) -> None:
    data = make_zip([f("fn.py", FN), f("requirements.txt", b"numpy\n")])
    root, manifest = validate_bundle(data, dest, LIMITS)
    assert root == dest
    assert manifest == Manifest()
    assert (dest / "fn.py").read_bytes() == FN
    assert (dest / "requirements.txt").read_text() == "numpy\n"


@pytest.mark.parametrize("create_system", [0, 3])  # made on Windows (no Unix mode) or on Unix
def test_plain_zipfile_writestr(create_system: int, dest: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in [("fn.py", FN), ("requirements.txt", b"")]:
            info = zipfile.ZipInfo(name)
            info.create_system = create_system
            info.external_attr = 0x20 if create_system == 0 else 0o100664 << 16
            archive.writestr(info, data)
    root, _ = validate_bundle(buffer.getvalue(), dest, LIMITS)
    assert stat.S_IMODE((root / "fn.py").stat().st_mode) == 0o644


@pytest.mark.parametrize("fmt", FORMATS)
def test_wrapped_folder(fmt: Fmt, dest: Path) -> None:
    data = make(fmt, [d("myfn"), f("myfn/fn.py", FN), f("myfn/requirements.txt"), f("__MACOSX/._fn.py")])
    root, _ = validate_bundle(data, dest, LIMITS)
    assert root == dest / "myfn"
    assert (root / "fn.py").read_bytes() == FN


def test_function_root_prefers_top_level_fn(dest: Path) -> None:
    (dest / "sub").mkdir(parents=True)
    assert function_root(dest) == dest / "sub"
    (dest / "aube.toml").write_text("")
    assert function_root(dest) == dest
    (dest / "aube.toml").unlink()
    (dest / "other").mkdir()
    assert function_root(dest) == dest


def test_plain_tar_with_dot_entries_and_nested_folders(dest: Path) -> None:
    data = make_tar([d("."), f("./fn.py", FN), f("./lib/deep/util.py", b"X = 1\n")], gz=False)
    assert sniff_archive(data) == "tar"
    root, _ = validate_bundle(data, dest, LIMITS)
    assert root == dest
    assert (dest / "lib" / "deep" / "util.py").read_text() == "X = 1\n"


@pytest.mark.parametrize("fmt", FORMATS)
def test_modes_keep_exec_bit_only(fmt: Fmt, dest: Path) -> None:
    data = make(fmt, [f("fn.py", FN, 0o600), f("prog", b"#!/bin/sh\n", 0o4775), f("ro", b"r", 0o400)])
    validate_bundle(data, dest, LIMITS)
    assert stat.S_IMODE((dest / "fn.py").stat().st_mode) == 0o644
    assert stat.S_IMODE((dest / "prog").stat().st_mode) == 0o755  # setuid and group write dropped
    assert stat.S_IMODE((dest / "ro").stat().st_mode) == 0o644


@pytest.mark.parametrize("fmt", FORMATS)
def test_links_staying_inside_are_kept(fmt: Fmt, dest: Path) -> None:
    data = make(
        fmt,
        [f("src/fn.py", FN), link("fn.py", "src/fn.py"), link("src/self", "../src"), link("dangling", "nope")],
    )
    root, _ = validate_bundle(data, dest, LIMITS)
    assert root == dest
    assert os.readlink(dest / "fn.py") == "src/fn.py"
    assert (dest / "fn.py").read_bytes() == FN
    assert os.readlink(dest / "src" / "self") == "../src"


def test_base64_upload_body_roundtrip(dest: Path) -> None:
    data = make_zip([f("fn.py", FN)])
    wrapped = base64.encodebytes(data).decode()  # line-wrapped, like `base64` without -w 0
    assert decode_base64(wrapped, LIMITS.max_compressed_bytes) == data


# --------------------------------------------------------------------------------------------------------
# Escapes: nothing outside dest, ever.


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "name",
    ["../sentinel", "a/../../sentinel", "..", "a\\..\\..\\sentinel", "C:/sentinel", "c:sentinel", "a/\nb"],
)
def test_unsafe_paths(fmt: Fmt, name: str, tmp_path: Path, dest: Path) -> None:
    err = refused(make(fmt, [f("fn.py", FN), f(name, b"pwned")]), dest, "bundle_unsafe_path")
    assert repr(name)[1:-1] in err.message or name in err.message
    assert outside(tmp_path) == set()


@pytest.mark.parametrize("fmt", FORMATS)
def test_absolute_path(fmt: Fmt, tmp_path: Path, dest: Path) -> None:
    sentinel = tmp_path / "sentinel"
    err = refused(make(fmt, [f("fn.py", FN), f(str(sentinel), b"pwned")]), dest, "bundle_unsafe_path")
    assert "absolute" in err.message
    assert str(sentinel) in err.message
    assert not sentinel.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_symlink_to_etc_passwd(fmt: Fmt, dest: Path) -> None:
    err = refused(make(fmt, [f("fn.py", FN), link("passwd", "/etc/passwd")]), dest, "bundle_link")
    assert "passwd" in err.message


@pytest.mark.parametrize("fmt", FORMATS)
def test_symlink_then_write_through_it(fmt: Fmt, tmp_path: Path, dest: Path) -> None:
    # The classic: a link to the parent, then a file "through" the link.
    data = make(fmt, [f("fn.py", FN), link("up", ".."), f("up/sentinel", b"pwned")])
    refused(data, dest, "bundle_link")
    assert outside(tmp_path) == set()


@pytest.mark.parametrize("fmt", FORMATS)
def test_symlink_then_file_with_same_name(fmt: Fmt, tmp_path: Path, dest: Path) -> None:
    data = make(fmt, [f("fn.py", FN), link("x", "../sentinel"), f("x", b"pwned")])
    with pytest.raises(InvalidBundle) as caught:
        validate_bundle(data, dest, LIMITS)
    assert caught.value.code in ("bundle_link", "bundle_unsafe_path")
    assert outside(tmp_path) == set()


@pytest.mark.parametrize("fmt", FORMATS)
def test_symlink_chain_escaping(fmt: Fmt, tmp_path: Path, dest: Path) -> None:
    # Each link alone looks harmless written out; followed as the kernel would, `x` is dest/..
    data = make(fmt, [f("fn.py", FN), link("sub/up", ".."), link("x", "sub/up/..")])
    err = refused(data, dest, "bundle_link")
    assert "'x'" in err.message
    assert outside(tmp_path) == set()


@pytest.mark.parametrize("fmt", FORMATS)
def test_symlink_loop(fmt: Fmt, dest: Path) -> None:
    refused(make(fmt, [f("fn.py", FN), link("a", "b"), link("b", "a/c")]), dest, "bundle_link")


def test_hardlink(tmp_path: Path, dest: Path) -> None:
    data = make_tar([f("fn.py", FN), ("h", "hardlink", "../sentinel", 0o644)])
    err = refused(data, dest, "bundle_link")
    assert "hardlink" in err.message
    assert "'h'" in err.message
    assert outside(tmp_path) == set()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["chr", "fifo"])
def test_device_and_fifo(fmt: Fmt, kind: Kind, dest: Path) -> None:
    err = refused(make(fmt, [f("fn.py", FN), ("special", kind, b"", 0o644)]), dest, "bundle_device_file")
    assert "special" in err.message


def test_socket_in_zip(dest: Path) -> None:
    refused(make_zip([f("fn.py", FN), ("sock", "socket", b"", 0o644)]), dest, "bundle_device_file")


@pytest.mark.parametrize("fmt", FORMATS)
def test_too_many_files(fmt: Fmt, dest: Path) -> None:
    limits = msgspec.structs.replace(LIMITS, max_files=5)
    err = refused(make(fmt, [f(f"f{i}.py") for i in range(6)]), dest, "bundle_too_many_files", limits)
    assert "f5.py" in err.message


@pytest.mark.parametrize("fmt", FORMATS)
def test_too_large_extracted(fmt: Fmt, dest: Path) -> None:
    # 2 MiB of zeros compresses to a few KiB: under the compressed limit, over the extracted one.
    data = make(fmt, [f("fn.py", FN), f("zeros.bin", bytes(2 << 20))])
    assert len(data) < LIMITS.max_compressed_bytes
    err = refused(data, dest, "bundle_too_large")
    assert "zeros.bin" in err.message


def test_too_large_compressed(dest: Path) -> None:
    limits = msgspec.structs.replace(LIMITS, max_compressed_bytes=1000)
    refused(make_zip([f("fn.py", os.urandom(4000))]), dest, "bundle_too_large", limits)


def _lie_about_size(data: bytes, name: bytes, declared: int) -> bytes:
    """Rewrite the uncompressed size of `name` in both the local header and the central directory."""
    buf = bytearray(data)
    local = buf.index(b"PK\x03\x04" + bytes(0))
    while local >= 0:
        name_len = struct.unpack_from("<H", buf, local + 26)[0]
        if bytes(buf[local + 30 : local + 30 + name_len]) == name:
            struct.pack_into("<I", buf, local + 22, declared)
        local = buf.find(b"PK\x03\x04", local + 4)
    central = buf.find(b"PK\x01\x02")
    while central >= 0:
        name_len = struct.unpack_from("<H", buf, central + 28)[0]
        if bytes(buf[central + 46 : central + 46 + name_len]) == name:
            struct.pack_into("<I", buf, central + 24, declared)
        central = buf.find(b"PK\x01\x02", central + 4)
    return bytes(buf)


def test_zip_bomb_with_lying_header(dest: Path) -> None:
    honest = make_zip([f("fn.py", FN), f("bomb.bin", bytes(4 << 20))])
    data = _lie_about_size(honest, b"bomb.bin", 10)
    assert zipfile.ZipFile(io.BytesIO(data)).getinfo("bomb.bin").file_size == 10
    with pytest.raises(InvalidBundle) as caught:
        validate_bundle(data, dest, LIMITS)
    assert caught.value.code in ("bundle_corrupt", "bundle_too_large")
    assert "bomb.bin" in caught.value.message
    assert not any(dest.iterdir())


@pytest.mark.parametrize("fmt", FORMATS)
def test_writer_counts_actual_bytes(fmt: Fmt, dest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even when the declared-size check is fooled, the writer stops at the limit on what it really wrote."""
    real_plan = bundle.plan_members
    generous = msgspec.structs.replace(LIMITS, max_extracted_bytes=1 << 40)

    def fooled(members: Sequence[MemberInfo], limits: BundleLimits) -> list[tuple[int, tuple[str, ...], MemberInfo]]:
        return real_plan(members, generous)

    monkeypatch.setattr(bundle, "plan_members", fooled)
    data = make(fmt, [f("fn.py", FN), f("zeros.bin", bytes(3 << 20))])
    err = refused(data, dest, "bundle_too_large")
    assert "zeros.bin" in err.message


def test_writer_refuses_more_data_than_declared(dest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_plan = bundle.plan_members

    def shrunk(members: Sequence[MemberInfo], limits: BundleLimits) -> list[tuple[int, tuple[str, ...], MemberInfo]]:
        return [(i, p, msgspec.structs.replace(m, size=min(m.size, 10))) for i, p, m in real_plan(members, limits)]

    monkeypatch.setattr(bundle, "plan_members", shrunk)
    err = refused(make_zip([f("fn.py", FN), f("big.bin", bytes(1000))]), dest, "bundle_corrupt")
    assert "more data than its header" in err.message


def test_checks_run_before_anything_is_written(dest: Path) -> None:
    # The bad member comes last: a writer that checked as it went would already have written fn.py.
    refused(make_zip([f("fn.py", FN), f("ok.txt"), link("bad", "/etc/shadow")]), dest, "bundle_link")


# --------------------------------------------------------------------------------------------------------
# Corrupt input.


def _gzip_of_text() -> bytes:
    return gzip.compress(b"just some text, no tar inside" * 30)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello",
        b"PK\x03\x04 not really a zip" * 20,
        os.urandom(3000),
        _gzip_of_text(),
    ],
    ids=["empty", "text", "fake-zip", "random", "gzip-text"],
)
def test_corrupt(data: bytes, dest: Path) -> None:
    with pytest.raises(InvalidBundle) as caught:
        sniff_archive(data)
    assert caught.value.code == "bundle_corrupt"
    refused(data, dest, "bundle_corrupt")


def test_truncated_archives(dest: Path) -> None:
    payload = os.urandom(200_000)  # incompressible, so a cut lands in the member's data
    tgz = make_tar([f("fn.py", FN), f("data.bin", payload)])
    refused(tgz[: len(tgz) // 2], dest, "bundle_corrupt")
    zipped = make_zip([f("fn.py", FN), f("data.bin", payload)])
    refused(zipped[: len(zipped) // 2], dest, "bundle_corrupt")


def test_zip_with_bad_crc(dest: Path) -> None:
    data = bytearray(make_zip([f("fn.py", FN)]))
    central = data.find(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 16, 0xDEADBEEF)
    refused(bytes(data), dest, "bundle_corrupt")


def test_encrypted_zip_member(dest: Path) -> None:
    data = bytearray(make_zip([f("fn.py", FN)]))
    central = data.find(b"PK\x01\x02")
    struct.pack_into("<H", data, central + 8, struct.unpack_from("<H", data, central + 8)[0] | 0x1)
    err = refused(bytes(data), dest, "bundle_corrupt")
    assert "encrypted" in err.message


def test_gzip_bomb_single_member(dest: Path) -> None:
    # 16 MiB of zeros in one member: refused from its header, long before its data would be inflated.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as archive:
        info = tarfile.TarInfo("bomb.bin")
        info.size = 16 << 20
        archive.addfile(info, io.BytesIO(bytes(info.size)))
    assert sniff_archive(buffer.getvalue()) == "tar"
    err = refused(buffer.getvalue(), dest, "bundle_too_large")
    assert "bomb.bin" in err.message


def test_sniff() -> None:
    assert sniff_archive(make_zip([f("fn.py", FN)])) == "zip"
    assert sniff_archive(make_tar([f("fn.py", FN)])) == "tar"
    assert sniff_archive(make_tar([f("fn.py", FN)], gz=False)) == "tar"


def test_decode_base64() -> None:
    assert decode_base64(base64.b64encode(b"abc").decode(), 10) == b"abc"
    with pytest.raises(InvalidBundle) as caught:
        decode_base64("not base64!!", 100)
    assert caught.value.code == "bundle_corrupt"
    with pytest.raises(InvalidBundle) as caught:
        decode_base64(base64.b64encode(bytes(101)).decode(), 100)
    assert caught.value.code == "bundle_too_large"
    with pytest.raises(InvalidBundle) as caught:
        decode_base64("A" * 10_000_000, 100)  # refused from the length, before decoding
    assert caught.value.code == "bundle_too_large"


def test_destination_must_be_empty(dest: Path) -> None:
    dest.mkdir()
    (dest / "old").write_text("x")
    with pytest.raises(ValueError, match="empty"):
        extract_archive(make_zip([f("fn.py", FN)]), dest, LIMITS)
    assert (dest / "old").read_text() == "x"


# --------------------------------------------------------------------------------------------------------
# The function inside the bundle.


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_fn(fmt: Fmt, dest: Path) -> None:
    err = refused(make(fmt, [f("main.py", FN), f("requirements.txt")]), dest, "bundle_missing_fn")
    assert "fn.py" in err.message


def test_fn_syntax_error_names_line(dest: Path) -> None:
    err = refused(make_zip([f("fn.py", b"import os\n\ndef fn(ws)\n    pass\n")]), dest, "bundle_fn_syntax")
    assert "line 3" in err.message


def test_fn_undefined(dest: Path) -> None:
    refused(make_zip([f("fn.py", b"def handler(ws):\n    pass\n")]), dest, "bundle_fn_undefined")


def test_manifest_in_bundle(dest: Path) -> None:
    toml = b'[function]\nruntime = "command"\ncommand = ["./prog"]\n[scaling]\nmin_free = 0\n'
    data = make_tar([f("aube.toml", toml), f("prog", b"#!/bin/sh\ncat\n", 0o755)])
    root, manifest = validate_bundle(data, dest, LIMITS)
    assert manifest.function.command == ["./prog"]
    assert manifest.scaling.min_free == 0
    assert os.access(root / "prog", os.X_OK)


def test_invalid_manifest_in_bundle(dest: Path) -> None:
    data = make_zip([f("fn.py", FN), f("aube.toml", b"[scaling]\nmax_instances = 0\n")])
    err = refused(data, dest, "bundle_invalid_manifest")
    assert "max_instances" in err.message


# --------------------------------------------------------------------------------------------------------
# check_members alone: pure.


def _check(*members: MemberInfo, limits: BundleLimits = LIMITS) -> str | None:
    try:
        check_members(members, limits)
    except InvalidBundle as e:
        return e.code
    return None


CASES: list[tuple[str, Callable[[], Sequence[MemberInfo]], str | None]] = [
    ("ok", lambda: [MemberInfo(name="fn.py", size=10)], None),
    ("root-dir", lambda: [MemberInfo(name="./", kind="dir"), MemberInfo(name="./fn.py")], None),
    ("dup-dirs", lambda: [MemberInfo(name="a/", kind="dir"), MemberInfo(name="a", kind="dir")], None),
    ("dup-file", lambda: [MemberInfo(name="fn.py"), MemberInfo(name="./fn.py")], "bundle_unsafe_path"),
    ("below-file", lambda: [MemberInfo(name="a"), MemberInfo(name="a/b")], "bundle_unsafe_path"),
    ("dot-file", lambda: [MemberInfo(name=".")], "bundle_unsafe_path"),
    ("nul", lambda: [MemberInfo(name="a\x00b")], "bundle_unsafe_path"),
    ("long", lambda: [MemberInfo(name="a" * 300)], "bundle_unsafe_path"),
    ("socket", lambda: [MemberInfo(name="s", kind="socket")], "bundle_device_file"),
    ("other", lambda: [MemberInfo(name="s", kind="other")], "bundle_device_file"),
    ("abs-link", lambda: [MemberInfo(name="l", kind="symlink", link_target="/")], "bundle_link"),
    ("empty-link", lambda: [MemberInfo(name="l", kind="symlink", link_target="")], "bundle_link"),
    ("up-link", lambda: [MemberInfo(name="a/b/l", kind="symlink", link_target="../../..")], "bundle_link"),
    ("in-link", lambda: [MemberInfo(name="a/b/l", kind="symlink", link_target="../../x")], None),
    ("size", lambda: [MemberInfo(name="a", size=1 << 20), MemberInfo(name="b", size=1)], "bundle_too_large"),
    ("count", lambda: [MemberInfo(name=f"{i}", kind="dir") for i in range(21)], "bundle_too_many_files"),
]


@pytest.mark.parametrize(("case", "members", "code"), CASES, ids=[c[0] for c in CASES])
def test_check_members(case: str, members: Callable[[], Sequence[MemberInfo]], code: str | None) -> None:
    assert _check(*members()) == code


# --------------------------------------------------------------------------------------------------------
# Depth (finding 9), central directories and bundles read from a file.


@pytest.mark.parametrize("fmt", FORMATS)
def test_folder_900_deep_is_bundle_too_deep(fmt: Fmt, dest: Path) -> None:
    deep = "/".join(["a"] * 900)
    err = refused(make(fmt, [f("fn.py", FN), f(f"{deep}/x.txt")]), dest, "bundle_too_deep")
    assert "901 levels deep" in err.message and "32" in err.message
    assert len(err.message) < 300


@pytest.mark.parametrize("fmt", FORMATS)
def test_depth_limit_is_inclusive(fmt: Fmt, dest: Path) -> None:
    limits = msgspec.structs.replace(LIMITS, max_depth=4)
    validate_bundle(make(fmt, [f("fn.py", FN), f("a/b/c/d.txt")]), dest, limits)
    refused(make(fmt, [f("fn.py", FN), d("a/b/c/d/e")]), dest.with_name("other"), "bundle_too_deep", limits)


def test_zip_entries_are_counted_before_the_central_directory_is_parsed(dest: Path) -> None:
    # Empty entries: zipfile builds an object per entry (300,000 took 170 MiB) before we could count them.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(10_000):
            archive.writestr(f"{i}", b"")
    err = refused(buffer.getvalue(), dest, "bundle_too_many_files")
    assert "'20'" in err.message


def test_zip_whose_end_record_lies_about_the_entry_count(dest: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(100):
            archive.writestr(f"{i}", b"")
    data = bytearray(buffer.getvalue())
    end = data.rindex(b"PK\x05\x06")
    data[end + 8 : end + 12] = struct.pack("<HH", 1, 1)  # entries on this disk / in total: "1"
    refused(bytes(data), dest, "bundle_too_many_files")


@pytest.mark.parametrize("fmt", FORMATS)
def test_bundle_read_from_a_file(fmt: Fmt, tmp_path: Path) -> None:
    archive = tmp_path / "bundle.archive"
    archive.write_bytes(make(fmt, [f("fn.py", FN), f("lib/x.py", b"X = 1\n")]))
    root, _ = validate_bundle(archive, tmp_path / "out", LIMITS)
    assert (root / "lib" / "x.py").read_bytes() == b"X = 1\n"
    big = tmp_path / "big.archive"
    big.write_bytes(make(fmt, [f("fn.py", FN)]) + bytes(LIMITS.max_compressed_bytes))
    with pytest.raises(InvalidBundle) as caught:
        validate_bundle(big, tmp_path / "out2", LIMITS)
    assert caught.value.code == "bundle_too_large"


def test_a_recursion_error_in_bundle_checks_is_a_bundle_error(dest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import aube.controlplane.bundle as bundle_module

    def recurse(root: Path, bounds: object) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(bundle_module, "load_manifest", recurse)
    err = refused(make("zip", [f("fn.py", FN)]), dest, "bundle_too_deep")
    assert "Traceback" not in err.message


def _header(info: tarfile.TarInfo, payload: bytes) -> bytes:
    return info.tobuf(format=tarfile.USTAR_FORMAT) + payload + bytes(-len(payload) % 512)


def _pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode() + b"=" + value + b"\n"
    length = len(body) + len(str(len(body)))
    length = len(body) + len(str(length))
    return str(length).encode() + body


def _tar_gz_after_fn(extra: bytes) -> bytes:
    fn = tarfile.TarInfo("fn.py")
    fn.size = len(FN)
    return gzip.compress(_header(fn, FN) + extra + bytes(1024))


def test_a_huge_pax_record_is_refused_before_tarfile_reads_it(dest: Path) -> None:
    # 100 MiB of pax record in ~100 KiB: tarfile read such a record whole (200 MiB took 414 MiB and 5 s).
    record = _pax_record("comment", b"a" * (100 << 20))
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, len(record)
    x = tarfile.TarInfo("x.txt")
    x.size = 1
    data = _tar_gz_after_fn(_header(pax, record) + _header(x, b"x"))
    assert len(data) < 200 * 1024
    limits = msgspec.structs.replace(LIMITS, max_extracted_bytes=256 << 20)
    err = refused(data, dest, "bundle_corrupt", limits)
    assert "header records" in err.message


def test_a_huge_gnu_long_name_is_refused(dest: Path) -> None:
    name = b"n" * (10 << 20)
    longname = tarfile.TarInfo("././@LongLink")
    longname.type, longname.size = tarfile.GNUTYPE_LONGNAME, len(name) + 1
    x = tarfile.TarInfo("x")
    x.size = 1
    limits = msgspec.structs.replace(LIMITS, max_extracted_bytes=256 << 20)
    refused(_tar_gz_after_fn(_header(longname, name + b"\0") + _header(x, b"x")), dest, "bundle_corrupt", limits)


def test_a_gnu_sparse_map_of_millions_of_entries_is_refused(dest: Path) -> None:
    # GNU sparse 1.0: the map sits at the start of the member's data and tarfile reads it all while listing.
    pax_body = b"".join(
        _pax_record(k, v)
        for k, v in (
            ("GNU.sparse.major", b"1"),
            ("GNU.sparse.minor", b"0"),
            ("GNU.sparse.name", b"holes"),
            ("GNU.sparse.realsize", b"10"),
        )
    )
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, len(pax_body)
    sparse_map = b"5000000\n" + b"0\n" * 10_000_000
    member = tarfile.TarInfo("holes")
    member.size = len(sparse_map)
    limits = msgspec.structs.replace(LIMITS, max_extracted_bytes=256 << 20)
    data = _tar_gz_after_fn(_header(pax, pax_body) + _header(member, sparse_map))
    err = refused(data, dest, "bundle_corrupt", limits)
    assert "sparse map" in err.message


def test_gnu_sparse_file_of_a_terabyte_is_refused_by_its_declared_size(dest: Path) -> None:
    sparse = tarfile.TarInfo("huge")
    sparse.type, sparse.size = tarfile.GNUTYPE_SPARSE, 0
    block = bytearray(sparse.tobuf(format=tarfile.GNU_FORMAT))
    # realsize (offset 483, 12 bytes octal) of a member that is all holes; the checksum is recomputed.
    block[483:495] = b"%011o\0" % (1 << 40)
    block[148:156] = b"        "
    block[148:156] = b"%06o\0 " % sum(block)
    refused(_tar_gz_after_fn(bytes(block)), dest, "bundle_too_large")
