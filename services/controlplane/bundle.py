"""Upload bundles: decoding, checking and extracting a zip / tar / tar.gz into a fresh folder safely.

The decision whether an archive is safe is `check_members` (bundle_checks.py), pure logic over normalized member
metadata (`MemberInfo`), so every rule is unit-tested without touching a disk. `extract_archive` lists the members
(archives.py, which reads archives within bounds), runs that check before writing anything, then writes with its
own guards: it counts the bytes it actually writes (a zip's header may lie about sizes), never writes through a
link (links are created last, files with O_EXCL|O_NOFOLLOW), and keeps only the exec bit of a file's mode. On any
error the destination is emptied.

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
import io
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from aube.controlplane.archives import (
    READ_ERRORS,
    count_zip_entries,
    list_tar,
    open_tar,
    read_error,
    sniff_archive,
    zip_member,
)
from aube.controlplane.bundle_checks import (
    BundleLimits,
    MemberInfo,
    MemberKind,
    PlannedMember,
    check_members,
    invalid_bundle,
    plan_members,
)
from aube.controlplane.manifest import (
    FN_FILE,
    MANIFEST_FILE,
    check_function,
    check_manifest,
    load_manifest,
    memory_bytes,
    parse_manifest,
)
from aube.controlplane.requirements import load_requirements
from aube.shared.errors import InvalidBundle
from aube.shared.schemas import Manifest

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

_CHUNK = 64 * 1024
# Folders that archivers add beside the real content; ignored when looking for a single wrapping folder.
_JUNK = frozenset({"__MACOSX", ".DS_Store"})

_Opener = Callable[[int, MemberInfo], IO[bytes]]


def decode_base64(text: str, limit: int) -> bytes:
    """The bytes of a base64 body; bundle_too_large above `limit`, bundle_corrupt when it is not base64.

    Line breaks are tolerated (`base64` without `-w 0` wraps at 76 columns). The size is checked from the
    text's length before decoding, so an oversized body costs no decoding memory.
    """
    compact = "".join(text.split())
    if len(compact) // 4 * 3 - 2 > limit:
        raise invalid_bundle("bundle_too_large", f"bundle is over the limit of {limit} bytes")
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as e:
        raise invalid_bundle("bundle_corrupt", f"bundle is not valid base64: {e}") from e
    if len(data) > limit:
        raise invalid_bundle("bundle_too_large", f"bundle is {len(data)} bytes, over the limit of {limit} bytes")
    return data


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
                raise invalid_bundle(
                    "bundle_too_large",
                    f"bundle extracts to more than the limit of {self.limit} bytes (at member {info.name!r})",
                )
            mine += len(chunk)
            if mine > info.size:
                raise invalid_bundle("bundle_corrupt", f"member {info.name!r} holds more data than its header says")
            self.written += len(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]


def _check_parent(root_real: str, path: str, name: str) -> None:
    # Belt and braces: the plan already guarantees no member lies below a link.
    parent = os.path.realpath(os.path.dirname(path))
    if parent != root_real and not parent.startswith(root_real + os.sep):
        raise invalid_bundle("bundle_unsafe_path", f"member {name!r} resolves outside the folder")


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


def _extract_zip(source: IO[bytes], root_real: str, limits: BundleLimits) -> None:
    count_zip_entries(source, limits.max_files)
    with zipfile.ZipFile(source) as archive:
        infos = archive.infolist()
        if len(infos) > limits.max_files:
            check_members([MemberInfo(name=i.filename, kind="dir") for i in infos], limits)
        members = [zip_member(archive, i) for i in infos]
        plan = plan_members(members, limits)
        _write_plan(plan, root_real, limits, lambda index, _: archive.open(infos[index]))


def _extract_tar(source: IO[bytes], root_real: str, limits: BundleLimits) -> None:
    # Headers and padding make a tar longer than its contents; allow for them when capping decompression.
    cap = limits.max_extracted_bytes + (limits.max_files + 16) * 2048 + (1 << 20)
    with open_tar(source, cap) as (tar, reader):
        listed = list_tar(tar, reader, limits)
        plan = plan_members([info for info, _ in listed], limits)

        def opener(index: int, info: MemberInfo) -> IO[bytes]:
            source = tar.extractfile(listed[index][1])
            if source is None:  # pragma: no cover - only for non-files, which the plan never opens
                raise invalid_bundle("bundle_corrupt", f"member {info.name!r} has no data")
            return source

        _write_plan(plan, root_real, limits, opener)


def _write_plan(
    plan: list[PlannedMember],
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
            raise invalid_bundle(
                "bundle_too_large", f"bundle is {size} bytes, over the limit of {limits.max_compressed_bytes}"
            )
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
        except READ_ERRORS as e:
            _clear(dest)
            raise read_error(e) from e
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
        raise invalid_bundle("bundle_too_deep", "bundle nests too deeply to be checked") from e
    return root, manifest


def _clear_quietly(dest: Path) -> None:
    if dest.is_dir():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
