"""Upload bundles: decoding, sniffing, checking and extracting a zip / tar / tar.gz into a fresh folder safely.

The decision whether an archive is safe is `check_members`, pure logic over normalized member metadata
(`MemberInfo`), so every rule is unit-tested without touching a disk. `extract_archive` lists the members,
runs that check before writing anything, then writes with its own guards: it counts the bytes it actually
writes (a zip's header may lie about sizes), never writes through a link (links are created last, files with
O_EXCL|O_NOFOLLOW), and keeps only the exec bit of a file's mode. On any error the destination is emptied.

The archive is read from bytes or from a file (an object-store upload is streamed to disk first, see
`aube.controlplane.objects`), never assembled in memory. Folder depth is bounded (`max_depth` path components),
which also keeps every recursive walk of the folder later (copies, removals) far from Python's recursion limit.

Error codes (InvalidBundle.code): bundle_corrupt, bundle_unsafe_path, bundle_link, bundle_device_file,
bundle_too_many_files, bundle_too_large, bundle_too_deep; `validate_bundle` adds those of
`aube.controlplane.manifest` and `aube.controlplane.requirements` (bundle_invalid_requirements).
"""

from __future__ import annotations

import base64
import binascii
import gzip
import io
import lzma
import os
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Literal

import msgspec

from aube.controlplane.manifest import (
    FN_FILE,
    MANIFEST_FILE,
    ManifestBounds,
    check_function,
    check_manifest,
    load_manifest,
    memory_bytes,
    parse_manifest,
)
from aube.controlplane.requirements import load_requirements
from aube.shared.errors import InvalidBundle
from aube.shared.schemas import Manifest
from aube.shared.settings import ControlPlaneSettings

__all__ = [
    "BundleLimits",
    "MemberInfo",
    "MemberKind",
    "check_function",
    "check_manifest",
    "check_members",
    "decode_base64",
    "extract_archive",
    "function_root",
    "load_manifest",
    "memory_bytes",
    "parse_manifest",
    "sniff_archive",
    "validate_bundle",
]

MemberKind = Literal["file", "dir", "symlink", "hardlink", "device", "fifo", "socket", "other"]

_CHUNK = 64 * 1024
_MAX_LINK_TARGET = 4096  # PATH_MAX: a longer symlink target cannot be created anyway
_MAX_NAME_BYTES = 255  # NAME_MAX of one path component
_MAX_PATH_BYTES = 4096
_SNIFF_CAP = 16 * 1024 * 1024  # decompressed bytes sniff_archive may read to see the first tar header
_MAX_LINK_HOPS = 40  # the kernel's own limit when resolving nested symlinks
# What tarfile may read for one member's header records (pax, GNU long name, sparse map); real ones take < 1 KiB.
_MAX_HEADER_BYTES = 256 * 1024
# Folders that archivers add beside the real content; ignored when looking for a single wrapping folder.
_JUNK = frozenset({"__MACOSX", ".DS_Store"})


class BundleLimits(msgspec.Struct, frozen=True, kw_only=True):
    max_compressed_bytes: int = 64 * 1024 * 1024
    max_extracted_bytes: int = 256 * 1024 * 1024
    max_files: int = 4096
    max_depth: int = 32  # path components of a member, the wrapping folder included
    manifest: ManifestBounds = msgspec.field(default_factory=ManifestBounds)

    @classmethod
    def from_settings(cls, settings: ControlPlaneSettings) -> BundleLimits:
        """ValueError names a setting that is unusable."""
        return cls(
            max_compressed_bytes=settings.max_bundle_bytes,
            max_extracted_bytes=settings.max_extracted_bytes,
            max_files=settings.max_files,
            max_depth=settings.max_bundle_depth,
            manifest=ManifestBounds.from_settings(settings),
        )


class MemberInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One archive member as zip and tar both describe it; `name` is the raw name from the archive."""

    name: str
    kind: MemberKind = "file"
    size: int = 0  # declared size of a file's data
    mode: int = 0o644  # permission bits as stored (only the exec bit survives extraction)
    link_target: str = ""  # symlink / hardlink target, as stored


# One member to write: its index in the archive's member list, its path below dest, its metadata.
_Step = tuple[int, tuple[str, ...], MemberInfo]
_Opener = Callable[[int, MemberInfo], IO[bytes]]


def _error(code: str, message: str) -> InvalidBundle:
    return InvalidBundle(message, code=code)


# ---------------------------------------------------------------------------------------------------------
# Pure checks.


def decode_base64(text: str, limit: int) -> bytes:
    """The bytes of a base64 body; bundle_too_large above `limit`, bundle_corrupt when it is not base64.

    Line breaks are tolerated (`base64` without `-w 0` wraps at 76 columns). The size is checked from the
    text's length before decoding, so an oversized body costs no decoding memory.
    """
    compact = "".join(text.split())
    if len(compact) // 4 * 3 - 2 > limit:
        raise _error("bundle_too_large", f"bundle is over the limit of {limit} bytes")
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _error("bundle_corrupt", f"bundle is not valid base64: {e}") from e
    if len(data) > limit:
        raise _error("bundle_too_large", f"bundle is {len(data)} bytes, over the limit of {limit} bytes")
    return data


def _normalize(info: MemberInfo) -> tuple[str, ...]:
    """The member's path as components below the destination; bundle_unsafe_path for any trick."""
    name = info.name

    def unsafe(why: str) -> InvalidBundle:
        return _error("bundle_unsafe_path", f"member {name!r}: {why}")

    if not name:
        raise unsafe("empty name")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise unsafe("control character in the name")
    if "\\" in name:
        raise unsafe("backslash in the name (a Windows path separator)")
    if name.startswith("/"):
        raise unsafe("absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise unsafe("'..' component leads outside the folder")
    if parts and len(parts[0]) >= 2 and parts[0][1] == ":" and parts[0][0].isascii() and parts[0][0].isalpha():
        raise unsafe("drive letter")
    if any(len(p.encode("utf-8", "surrogateescape")) > _MAX_NAME_BYTES for p in parts):
        raise unsafe("a path component is longer than 255 bytes")
    if len(name.encode("utf-8", "surrogateescape")) > _MAX_PATH_BYTES:
        raise unsafe("path is longer than 4096 bytes")
    if not parts and info.kind != "dir":
        raise unsafe("names the folder itself")
    return parts


def _resolve_inside(start: tuple[str, ...], target: str, links: dict[tuple[str, ...], str]) -> bool:
    """Whether `target`, resolved from folder `start` the way the kernel would, stays inside the root.

    Links among the members are followed as they would be on disk: `x -> sub/l/..` with `sub/l -> ..`
    escapes although it looks harmless written out, so a purely lexical check is not enough.
    """
    if target.startswith("/"):
        return False
    stack = list(start)
    pending = list(reversed(target.split("/")))
    hops = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                return False
            stack.pop()
            continue
        stack.append(part)
        nested = links.get(tuple(stack))
        if nested is not None:
            hops += 1
            if hops > _MAX_LINK_HOPS or nested.startswith("/"):
                return False
            stack.pop()
            pending.extend(reversed(nested.split("/")))
    return True


def _plan(members: Sequence[MemberInfo], limits: BundleLimits) -> list[_Step]:
    """check_members, returning each member's normalized path for the writer."""
    if len(members) > limits.max_files:
        raise _error(
            "bundle_too_many_files",
            f"bundle has {len(members)} entries, more than the limit of {limits.max_files}"
            f" (first one over: {members[limits.max_files].name!r})",
        )
    planned: list[_Step] = []
    total = 0
    kinds: dict[tuple[str, ...], MemberKind] = {}
    for index, info in enumerate(members):
        if info.kind in ("device", "fifo", "socket", "other"):
            what = {"device": "a device file", "fifo": "a fifo", "socket": "a socket"}.get(info.kind, "a special file")
            raise _error("bundle_device_file", f"member {info.name!r} is {what}; only files, folders and links")
        if info.kind == "hardlink":
            raise _error(
                "bundle_link",
                f"member {info.name!r} is a hardlink (to {info.link_target!r}); hardlinks are not supported",
            )
        parts = _normalize(info)
        if len(parts) > limits.max_depth:
            raise _error(
                "bundle_too_deep",
                f"member {'/'.join(parts[: limits.max_depth + 1])!r}/... lies {len(parts)} levels deep,"
                f" more than the limit of {limits.max_depth}",
            )
        if info.kind == "file":
            if info.size < 0:
                raise _error("bundle_corrupt", f"member {info.name!r} declares a negative size")
            total += info.size
            if total > limits.max_extracted_bytes:
                raise _error(
                    "bundle_too_large",
                    f"bundle extracts to more than the limit of {limits.max_extracted_bytes} bytes"
                    f" (reached at member {info.name!r}, {info.size} bytes)",
                )
        if info.kind == "symlink" and (
            not info.link_target or "\x00" in info.link_target or len(info.link_target) > _MAX_LINK_TARGET
        ):
            raise _error("bundle_link", f"symlink {info.name!r} has an unusable target")
        previous = kinds.get(parts)
        if previous is not None and not (previous == "dir" and info.kind == "dir"):
            raise _error("bundle_unsafe_path", f"member {info.name!r} appears more than once in the bundle")
        kinds[parts] = info.kind
        if parts:
            planned.append((index, parts, info))
    links = {parts: info.link_target for _, parts, info in planned if info.kind == "symlink"}
    for _, parts, info in planned:
        # Nothing may sit below a link or a file: writing it would follow the link (or fail half-way).
        for depth in range(1, len(parts)):
            above = kinds.get(parts[:depth])
            if above == "symlink":
                raise _error("bundle_link", f"member {info.name!r} lies below the symlink {'/'.join(parts[:depth])!r}")
            if above is not None and above != "dir":
                raise _error(
                    "bundle_unsafe_path",
                    f"member {info.name!r} lies below {'/'.join(parts[:depth])!r}, which is not a folder",
                )
        if info.kind == "symlink" and not _resolve_inside(parts[:-1], info.link_target, links):
            raise _error(
                "bundle_link",
                f"symlink {info.name!r} -> {info.link_target!r} leads outside the folder (or loops)",
            )
    return planned


def check_members(members: Sequence[MemberInfo], limits: BundleLimits) -> None:
    """Every check that needs only the members' metadata: count, declared sizes, paths, types and links."""
    _plan(members, limits)


# ---------------------------------------------------------------------------------------------------------
# Reading archives.


# Errors the archive libraries raise on damaged input (BadGzipFile is an OSError, so it is named here).
_READ_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    tarfile.TarError,
    gzip.BadGzipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    NotImplementedError,  # a zip compression method the stdlib lacks
    struct.error,
    ValueError,  # e.g. zipfile seeking to a negative offset read from a damaged header
)


def sniff_archive(data: bytes | IO[bytes]) -> Literal["zip", "tar"]:
    """ "zip" for a zip; "tar" for a plain tar or a gzip-compressed one; bundle_corrupt for anything else.

    `data` is the archive's bytes or a seekable binary file holding it."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        if _magic(source) == b"PK" and zipfile.is_zipfile(source):
            return "zip"
        # Opening reads the first header only (a gzip stream that is not a tar fails here); the cap is for
        # a first header that declares an enormous pax or long-name record.
        with _open_tar(source, cap=_SNIFF_CAP):
            pass
    except (*_READ_ERRORS, OSError) as e:
        raise _error("bundle_corrupt", f"bundle is not a zip, tar or tar.gz archive ({e})") from e
    finally:
        source.seek(0)
    return "tar"


def _magic(source: IO[bytes]) -> bytes:
    source.seek(0)
    magic = source.read(2)
    source.seek(0)
    return magic


class _CappedReader(io.RawIOBase):
    """A (decompressed) tar stream that refuses to go past `cap` bytes: a gzip bomb stops here while reading
    headers, before any declared size is even summed.

    While `header_budget` is set (around each `TarFile.next()`), reads count against it: tarfile reads a
    member's pax record, GNU long name or sparse map whole into memory, and a 199 KiB tar.gz holding a 200 MiB
    pax record took 414 MiB and 5 s before this budget."""

    def __init__(self, inner: IO[bytes] | io.BufferedIOBase, cap: int, *, owns_inner: bool = True) -> None:
        super().__init__()
        self._inner = inner
        self._cap = cap
        self._owns_inner = owns_inner
        self.header_budget: int | None = None

    def _over(self) -> InvalidBundle:
        return _error("bundle_too_large", f"bundle decompresses to more than {self._cap} bytes")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.header_budget is not None and (size < 0 or size > self.header_budget):
            raise _error(
                "bundle_corrupt",
                f"a member's header records (pax, long name or sparse map) are over {_MAX_HEADER_BYTES} bytes",
            )
        position = self._inner.tell()
        if size < 0 or position + size > self._cap:
            size = self._cap - position + 1
        data = self._inner.read(max(size, 0))
        if position + len(data) > self._cap:
            raise self._over()
        if self.header_budget is not None:
            self.header_budget -= len(data)
        return data

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET and offset > self._cap:
            raise self._over()
        position = self._inner.seek(offset, whence)
        if position > self._cap:
            raise self._over()
        return position

    def tell(self) -> int:
        return self._inner.tell()

    def close(self) -> None:
        if self._owns_inner:
            self._inner.close()
        super().close()


@contextmanager
def _open_tar(source: IO[bytes], cap: int) -> Iterator[tuple[tarfile.TarFile, _CappedReader]]:
    if _magic(source) == b"\x1f\x8b":
        raw = _CappedReader(gzip.GzipFile(fileobj=source, mode="rb"), cap)
    else:
        raw = _CappedReader(source, cap, owns_inner=False)
    # The first header is read here: under the budget too.
    raw.header_budget = _MAX_HEADER_BYTES
    with raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        raw.header_budget = None
        yield tar, raw


def _zip_mode(info: zipfile.ZipInfo) -> int:
    # Only archives made on Unix (create_system 3) carry a st_mode in the high half of external_attr.
    return (info.external_attr >> 16) if info.create_system == 3 else 0


def _zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> MemberInfo:
    if info.flag_bits & 0x1:
        raise _error("bundle_corrupt", f"member {info.filename!r} is encrypted")
    mode = _zip_mode(info)
    kind: MemberKind = "file"
    target = ""
    if info.is_dir() or stat.S_ISDIR(mode):
        kind = "dir"
    elif stat.S_ISLNK(mode):
        kind = "symlink"
        if info.file_size > _MAX_LINK_TARGET:
            raise _error("bundle_link", f"symlink {info.filename!r} has a target longer than 4096 bytes")
        with archive.open(info) as f:
            raw = f.read(_MAX_LINK_TARGET + 1)
        try:
            target = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _error("bundle_link", f"symlink {info.filename!r} has a target that is not UTF-8") from e
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "device"
    elif stat.S_ISFIFO(mode):
        kind = "fifo"
    elif stat.S_ISSOCK(mode):
        kind = "socket"
    elif stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        kind = "other"
    return MemberInfo(name=info.filename, kind=kind, size=info.file_size, mode=mode & 0o7777, link_target=target)


def _tar_member(info: tarfile.TarInfo) -> MemberInfo:
    kind: MemberKind
    if info.isreg():
        kind = "file"
    elif info.isdir():
        kind = "dir"
    elif info.issym():
        kind = "symlink"
    elif info.islnk():
        kind = "hardlink"
    elif info.ischr() or info.isblk():
        kind = "device"
    elif info.isfifo():
        kind = "fifo"
    else:
        kind = "other"
    return MemberInfo(name=info.name, kind=kind, size=info.size, mode=info.mode & 0o7777, link_target=info.linkname)


def _list_tar(
    tar: tarfile.TarFile, reader: _CappedReader, limits: BundleLimits
) -> list[tuple[MemberInfo, tarfile.TarInfo]]:
    # Walk header by header so a huge or bomb-like archive is refused before tarfile skips through its data.
    found: list[tuple[MemberInfo, tarfile.TarInfo]] = []
    declared = 0
    while True:
        try:
            reader.header_budget = _MAX_HEADER_BYTES
            member = tar.next()
            reader.header_budget = None
        except InvalidBundle as e:
            if not found or e.code != "bundle_too_large":
                raise
            # The decompression cap: say which member's data it was reached in.
            raise _error(e.code, f"{e.message} (in the data of member {found[-1][0].name!r})") from e
        if member is None:
            break
        info = _tar_member(member)
        found.append((info, member))
        if info.kind == "file":
            declared += info.size
        if len(found) > limits.max_files or declared > limits.max_extracted_bytes:
            check_members([i for i, _ in found], limits)  # raises, naming the member
    return found


# ---------------------------------------------------------------------------------------------------------
# Writing.


class _Budget:
    """Bytes actually written, against the limit: what a lying header declares does not matter here."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.written = 0

    def copy(self, source: IO[bytes], fd: int, info: MemberInfo) -> None:
        mine = 0
        while chunk := source.read(_CHUNK):
            if self.written + len(chunk) > self.limit:
                raise _error(
                    "bundle_too_large",
                    f"bundle extracts to more than the limit of {self.limit} bytes (at member {info.name!r})",
                )
            mine += len(chunk)
            if mine > info.size:
                raise _error("bundle_corrupt", f"member {info.name!r} holds more data than its header says")
            self.written += len(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]


def _check_parent(root_real: str, path: str, name: str) -> None:
    # Belt and braces: the plan already guarantees no member lies below a link.
    parent = os.path.realpath(os.path.dirname(path))
    if parent != root_real and not parent.startswith(root_real + os.sep):
        raise _error("bundle_unsafe_path", f"member {name!r} resolves outside the folder")


def _write_file(root_real: str, parts: tuple[str, ...], info: MemberInfo, source: IO[bytes], budget: _Budget) -> None:
    path = os.path.join(root_real, *parts)
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    _check_parent(root_real, path, info.name)
    mode = 0o755 if info.mode & 0o111 else 0o644
    # O_EXCL|O_NOFOLLOW: never write through anything already there, a link least of all.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        budget.copy(source, fd, info)
        os.fchmod(fd, mode)  # after writing, and explicitly: the umask must not decide, setuid never survives
    finally:
        os.close(fd)


def _clear(dest: Path) -> None:
    """Remove everything inside dest without following any link (rmtree does not follow them either)."""
    for child in dest.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _read_error(e: BaseException) -> InvalidBundle:
    return _error("bundle_corrupt", f"bundle could not be read: {type(e).__name__}: {e}")


_CENTRAL_SIGNATURE = b"PK\x01\x02"
_CENTRAL_HEADER = struct.Struct("<4s24xHHH12x")  # signature, name / extra / comment lengths of a 46-byte record


def _count_zip_entries(source: IO[bytes], limit: int) -> None:
    """bundle_too_many_files before zipfile parses the central directory: it builds an object per entry, and a
    bundle of empty entries holds ~12,000 of them per MiB (300,000 entries took 170 MiB and 1.3 s). The records
    themselves are walked, since the end record's entry count can lie."""
    end = zipfile._EndRecData(source)  # type: ignore[attr-defined]
    if end is None:
        return  # not a zip after all: zipfile says so next
    size = end[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
    position = end[zipfile._ECD_LOCATION] - size  # type: ignore[attr-defined]
    if end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:  # type: ignore[attr-defined]
        position -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator  # type: ignore[attr-defined]
    stop, count = position + size, 0
    while 0 <= position < stop:
        source.seek(position)
        raw = source.read(_CENTRAL_HEADER.size)
        if len(raw) < _CENTRAL_HEADER.size:
            break
        signature, name_len, extra_len, comment_len = _CENTRAL_HEADER.unpack(raw)
        if signature != _CENTRAL_SIGNATURE:
            break
        count += 1
        if count > limit:
            name = source.read(min(name_len, _MAX_NAME_BYTES)).decode("utf-8", "replace")
            raise _error(
                "bundle_too_many_files",
                f"bundle has more than {limit} entries, the limit (first one over: {name!r})",
            )
        position += _CENTRAL_HEADER.size + name_len + extra_len + comment_len
    source.seek(0)


def _extract_zip(source: IO[bytes], root_real: str, limits: BundleLimits) -> None:
    _count_zip_entries(source, limits.max_files)
    with zipfile.ZipFile(source) as archive:
        infos = archive.infolist()
        if len(infos) > limits.max_files:
            check_members([MemberInfo(name=i.filename, kind="dir") for i in infos], limits)
        members = [_zip_member(archive, i) for i in infos]
        plan = _plan(members, limits)
        _write_plan(plan, root_real, limits, lambda index, _: archive.open(infos[index]))


def _extract_tar(source: IO[bytes], root_real: str, limits: BundleLimits) -> None:
    # Headers and padding make a tar longer than its contents; allow for them when capping decompression.
    cap = limits.max_extracted_bytes + (limits.max_files + 16) * 2048 + (1 << 20)
    with _open_tar(source, cap) as (tar, reader):
        listed = _list_tar(tar, reader, limits)
        plan = _plan([info for info, _ in listed], limits)

        def opener(index: int, info: MemberInfo) -> IO[bytes]:
            source = tar.extractfile(listed[index][1])
            if source is None:  # pragma: no cover - only for non-files, which the plan never opens
                raise _error("bundle_corrupt", f"member {info.name!r} has no data")
            return source

        _write_plan(plan, root_real, limits, opener)


def _write_plan(
    plan: list[_Step],
    root_real: str,
    limits: BundleLimits,
    opener: _Opener,
) -> None:
    for _, parts, info in plan:
        if info.kind == "dir":
            os.makedirs(os.path.join(root_real, *parts), mode=0o755, exist_ok=True)
    budget = _Budget(limits.max_extracted_bytes)
    for index, parts, info in plan:  # archive order: a compressed tar is then read front to back
        if info.kind == "file":
            with opener(index, info) as source:
                _write_file(root_real, parts, info, source, budget)
    # Links last, so no file or folder is ever written through one.
    for _, parts, info in plan:
        if info.kind == "symlink":
            path = os.path.join(root_real, *parts)
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            _check_parent(root_real, path, info.name)
            os.symlink(info.link_target, path)
    for _, parts, info in plan:
        if info.kind == "dir":  # archivers may store read-only folders; we must be able to clean up
            os.chmod(os.path.join(root_real, *parts), 0o755, follow_symlinks=False)


def extract_archive(data: bytes | Path, dest: Path, limits: BundleLimits) -> None:
    """Check, then extract, a zip / tar / tar.gz (its bytes, or a file holding it) into `dest` (created if
    absent; must be empty).

    On any error `dest` is left empty and the error raised; nothing outside `dest` is ever touched.
    """
    with io.BytesIO(data) if isinstance(data, bytes) else data.open("rb") as source:
        size = source.seek(0, io.SEEK_END)
        source.seek(0)
        if size > limits.max_compressed_bytes:
            raise _error("bundle_too_large", f"bundle is {size} bytes, over the limit of {limits.max_compressed_bytes}")
        dest.mkdir(parents=True, exist_ok=True)
        if any(dest.iterdir()):
            raise ValueError(f"extract_archive needs an empty destination, {dest} is not")
        root_real = os.path.realpath(dest)
        kind = sniff_archive(source)
        try:
            if kind == "zip":
                _extract_zip(source, root_real, limits)
            else:
                _extract_tar(source, root_real, limits)
        except InvalidBundle:
            _clear(dest)
            raise
        except _READ_ERRORS as e:
            _clear(dest)
            raise _read_error(e) from e
        except BaseException:
            _clear(dest)
            raise


def function_root(dest: Path) -> Path:
    """`dest`, or its one top-level folder when the archive wrapped everything in it (`zip -r f.zip myfn/`)."""
    if (dest / FN_FILE).exists() or (dest / MANIFEST_FILE).exists():
        return dest
    entries = [p for p in dest.iterdir() if p.name not in _JUNK]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return dest


def validate_bundle(data: bytes | Path, dest: Path, limits: BundleLimits) -> tuple[Path, Manifest]:
    """Extract and check a whole upload (its bytes, or a file holding it): the function folder inside `dest` and
    its manifest.

    On any error `dest` is left empty (the caller removes it).
    """
    try:
        extract_archive(data, dest, limits)
        try:
            root = function_root(dest)
            manifest = load_manifest(root, limits.manifest)
            check_function(root, manifest)
            load_requirements(root)  # refuses anything but requirement specifiers, before any build
        except BaseException:
            _clear(dest)
            raise
    except RecursionError as e:
        # Nothing here should recurse with the input's shape (depth is bounded before writing); if something
        # still does, it is the bundle's doing and gets a bundle error, not an internal one with a traceback.
        _clear_quietly(dest)
        raise _error("bundle_too_deep", "bundle nests too deeply to be checked") from e
    return root, manifest


def _clear_quietly(dest: Path) -> None:
    if dest.is_dir():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
