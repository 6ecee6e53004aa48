"""Which members a bundle may hold: every rule that needs only the members' metadata, without touching a disk.

Its own module because these are the decisions of extraction, pure logic over normalized member metadata
(`MemberInfo`): member count, declared sizes, depth, names (no absolute path, `..`, drive letter, control
character), member types (no device, fifo, socket or hardlink) and symlinks, resolved among the members the way
the kernel would, so that none leads outside the folder. `bundle.py` lists an archive's members, runs
`plan_members` before writing anything, and writes what it returns; every rule is unit-tested without archives.

Error codes (InvalidBundle.code): bundle_corrupt, bundle_unsafe_path, bundle_link, bundle_device_file,
bundle_too_many_files, bundle_too_large, bundle_too_deep.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import msgspec

from aube.controlplane.manifest import ManifestBounds
from aube.shared.errors import InvalidBundle
from aube.shared.settings import ControlPlaneSettings

MemberKind = Literal["file", "dir", "symlink", "hardlink", "device", "fifo", "socket", "other"]

MAX_LINK_TARGET = 4096  # PATH_MAX: a longer symlink target cannot be created anyway
MAX_NAME_BYTES = 255  # NAME_MAX of one path component
_MAX_PATH_BYTES = 4096
_MAX_LINK_HOPS = 40  # the kernel's own limit when resolving nested symlinks


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
PlannedMember = tuple[int, tuple[str, ...], MemberInfo]


def invalid_bundle(code: str, message: str) -> InvalidBundle:
    return InvalidBundle(message, code=code)


def _normalize(info: MemberInfo) -> tuple[str, ...]:
    """The member's path as components below the destination; bundle_unsafe_path for any trick."""
    name = info.name

    def unsafe(why: str) -> InvalidBundle:
        return invalid_bundle("bundle_unsafe_path", f"member {name!r}: {why}")

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
    if any(len(p.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES for p in parts):
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


def plan_members(members: Sequence[MemberInfo], limits: BundleLimits) -> list[PlannedMember]:
    """check_members, returning each member's normalized path for the writer."""
    if len(members) > limits.max_files:
        raise invalid_bundle(
            "bundle_too_many_files",
            f"bundle has {len(members)} entries, more than the limit of {limits.max_files}"
            f" (first one over: {members[limits.max_files].name!r})",
        )
    planned: list[PlannedMember] = []
    total = 0
    kinds: dict[tuple[str, ...], MemberKind] = {}
    for index, info in enumerate(members):
        if info.kind in ("device", "fifo", "socket", "other"):
            what = {"device": "a device file", "fifo": "a fifo", "socket": "a socket"}.get(info.kind, "a special file")
            raise invalid_bundle("bundle_device_file", f"member {info.name!r} is {what}; only files, folders and links")
        if info.kind == "hardlink":
            raise invalid_bundle(
                "bundle_link",
                f"member {info.name!r} is a hardlink (to {info.link_target!r}); hardlinks are not supported",
            )
        parts = _normalize(info)
        if len(parts) > limits.max_depth:
            raise invalid_bundle(
                "bundle_too_deep",
                f"member {'/'.join(parts[: limits.max_depth + 1])!r}/... lies {len(parts)} levels deep,"
                f" more than the limit of {limits.max_depth}",
            )
        if info.kind == "file":
            if info.size < 0:
                raise invalid_bundle("bundle_corrupt", f"member {info.name!r} declares a negative size")
            total += info.size
            if total > limits.max_extracted_bytes:
                raise invalid_bundle(
                    "bundle_too_large",
                    f"bundle extracts to more than the limit of {limits.max_extracted_bytes} bytes"
                    f" (reached at member {info.name!r}, {info.size} bytes)",
                )
        if info.kind == "symlink" and (
            not info.link_target or "\x00" in info.link_target or len(info.link_target) > MAX_LINK_TARGET
        ):
            raise invalid_bundle("bundle_link", f"symlink {info.name!r} has an unusable target")
        previous = kinds.get(parts)
        if previous is not None and not (previous == "dir" and info.kind == "dir"):
            raise invalid_bundle("bundle_unsafe_path", f"member {info.name!r} appears more than once in the bundle")
        kinds[parts] = info.kind
        if parts:
            planned.append((index, parts, info))
    links = {parts: info.link_target for _, parts, info in planned if info.kind == "symlink"}
    for _, parts, info in planned:
        # Nothing may sit below a link or a file: writing it would follow the link (or fail half-way).
        for depth in range(1, len(parts)):
            above = kinds.get(parts[:depth])
            if above == "symlink":
                raise invalid_bundle(
                    "bundle_link", f"member {info.name!r} lies below the symlink {'/'.join(parts[:depth])!r}"
                )
            if above is not None and above != "dir":
                raise invalid_bundle(
                    "bundle_unsafe_path",
                    f"member {info.name!r} lies below {'/'.join(parts[:depth])!r}, which is not a folder",
                )
        if info.kind == "symlink" and not _resolve_inside(parts[:-1], info.link_target, links):
            raise invalid_bundle(
                "bundle_link",
                f"symlink {info.name!r} -> {info.link_target!r} leads outside the folder (or loops)",
            )
    return planned


def check_members(members: Sequence[MemberInfo], limits: BundleLimits) -> None:
    """Every check that needs only the members' metadata: count, declared sizes, paths, types and links."""
    plan_members(members, limits)
