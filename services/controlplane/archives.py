"""Reading zip and tar archives into `MemberInfo`s, within bounds, before anything is extracted.

Its own module because the archive libraries trust their input: zipfile builds an object per central-directory
entry and tarfile reads a member's header records whole into memory. Here the central directory's entries are
counted first (`count_zip_entries`), a (decompressed) tar is read through a `CappedReader` that stops a gzip bomb
and bounds each member's header records, and a tar is listed header by header (`list_tar`) so that a huge archive
is refused before tarfile skips through its data. Damaged input becomes bundle_corrupt (`READ_ERRORS`).
"""

from __future__ import annotations

import gzip
import io
import lzma
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Literal

from aube.controlplane.bundle_checks import (
    MAX_LINK_TARGET,
    MAX_NAME_BYTES,
    BundleLimits,
    MemberInfo,
    MemberKind,
    check_members,
    invalid_bundle,
)
from aube.shared.errors import InvalidBundle

_SNIFF_CAP = 16 * 1024 * 1024  # decompressed bytes sniff_archive may read to see the first tar header
# What tarfile may read for one member's header records (pax, GNU long name, sparse map); real ones take < 1 KiB.
_MAX_HEADER_BYTES = 256 * 1024


# Errors the archive libraries raise on damaged input (BadGzipFile is an OSError, so it is named here).
READ_ERRORS = (
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
        with open_tar(source, cap=_SNIFF_CAP):
            pass
    except (*READ_ERRORS, OSError) as e:
        raise invalid_bundle("bundle_corrupt", f"bundle is not a zip, tar or tar.gz archive ({e})") from e
    finally:
        source.seek(0)
    return "tar"


def _magic(source: IO[bytes]) -> bytes:
    source.seek(0)
    magic = source.read(2)
    source.seek(0)
    return magic


class CappedReader(io.RawIOBase):
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
        return invalid_bundle("bundle_too_large", f"bundle decompresses to more than {self._cap} bytes")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.header_budget is not None and (size < 0 or size > self.header_budget):
            raise invalid_bundle(
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
def open_tar(source: IO[bytes], cap: int) -> Iterator[tuple[tarfile.TarFile, CappedReader]]:
    if _magic(source) == b"\x1f\x8b":
        raw = CappedReader(gzip.GzipFile(fileobj=source, mode="rb"), cap)
    else:
        raw = CappedReader(source, cap, owns_inner=False)
    # The first header is read here: under the budget too.
    raw.header_budget = _MAX_HEADER_BYTES
    with raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        raw.header_budget = None
        yield tar, raw


def _zip_mode(info: zipfile.ZipInfo) -> int:
    # Only archives made on Unix (create_system 3) carry a st_mode in the high half of external_attr.
    return (info.external_attr >> 16) if info.create_system == 3 else 0


def zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> MemberInfo:
    if info.flag_bits & 0x1:
        raise invalid_bundle("bundle_corrupt", f"member {info.filename!r} is encrypted")
    mode = _zip_mode(info)
    kind: MemberKind = "file"
    target = ""
    if info.is_dir() or stat.S_ISDIR(mode):
        kind = "dir"
    elif stat.S_ISLNK(mode):
        kind = "symlink"
        if info.file_size > MAX_LINK_TARGET:
            raise invalid_bundle("bundle_link", f"symlink {info.filename!r} has a target longer than 4096 bytes")
        with archive.open(info) as f:
            raw = f.read(MAX_LINK_TARGET + 1)
        try:
            target = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise invalid_bundle("bundle_link", f"symlink {info.filename!r} has a target that is not UTF-8") from e
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


def list_tar(
    tar: tarfile.TarFile, reader: CappedReader, limits: BundleLimits
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
            raise invalid_bundle(e.code, f"{e.message} (in the data of member {found[-1][0].name!r})") from e
        if member is None:
            break
        info = _tar_member(member)
        found.append((info, member))
        if info.kind == "file":
            declared += info.size
        if len(found) > limits.max_files or declared > limits.max_extracted_bytes:
            check_members([i for i, _ in found], limits)  # raises, naming the member
    return found


def read_error(e: BaseException) -> InvalidBundle:
    return invalid_bundle("bundle_corrupt", f"bundle could not be read: {type(e).__name__}: {e}")


_CENTRAL_SIGNATURE = b"PK\x01\x02"
_CENTRAL_HEADER = struct.Struct("<4s24xHHH12x")  # signature, name / extra / comment lengths of a 46-byte record


def count_zip_entries(source: IO[bytes], limit: int) -> None:
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
            name = source.read(min(name_len, MAX_NAME_BYTES)).decode("utf-8", "replace")
            raise invalid_bundle(
                "bundle_too_many_files",
                f"bundle has more than {limit} entries, the limit (first one over: {name!r})",
            )
        position += _CENTRAL_HEADER.size + name_len + extra_len + comment_len
    source.seek(0)
