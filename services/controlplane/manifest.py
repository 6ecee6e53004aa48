"""The function folder's own rules: parsing `aube.toml` into a Manifest, and checking `fn.py` or the command.

Pure logic over a folder already on disk (extracted by `aube.controlplane.bundle`): no network, no engine.
Every problem is an InvalidBundle whose `code` names it (bundle_invalid_manifest, bundle_missing_fn,
bundle_fn_syntax, bundle_fn_undefined, bundle_unsafe_path, bundle_too_large) and whose message names the file and
the key. The operator's ranges for limits and scaling values (`ManifestBounds`, from the control plane's settings)
are checked here too, so a deployer cannot ask for more than the operator allows.
"""

from __future__ import annotations

import ast
import math
import os
import re
import tomllib
from pathlib import Path

import msgspec

from aube.controlplane.bounds import (
    MESSAGE_MAX,
    MESSAGE_MIN,
    ManifestBounds,
    check_bounds,
    defaults_within,
    memory_bytes,
    message_bytes,
    reserved_env_reason,
)
from aube.shared.errors import InvalidBundle
from aube.shared.schemas import LimitsSection, Manifest

__all__ = [
    "FN_FILE",
    "MANIFEST_FILE",
    "MAX_FN_BYTES",
    "MAX_MANIFEST_BYTES",
    "ManifestBounds",
    "check_function",
    "check_manifest",
    "load_manifest",
    "memory_bytes",
    "message_bytes",
    "parse_manifest",
]

MANIFEST_FILE = "aube.toml"
FN_FILE = "fn.py"

# Read whole and parsed by tomllib: a manifest is a few lines, and nothing past this size is parsed at all.
MAX_MANIFEST_BYTES = 64 * 1024
# fn.py is compiled here to catch syntax errors at upload; CPython's parser and compiler take 200-500 times the
# source's size in memory (1 MiB of source: 270-500 MiB; 234 KiB of list literal: 112 MiB), so only a small fn.py
# is compiled; larger code belongs in modules beside it.
MAX_FN_BYTES = 128 * 1024

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _invalid(message: str) -> InvalidBundle:
    return InvalidBundle(f"{MANIFEST_FILE}: {message}", code="bundle_invalid_manifest")


def parse_manifest(data: bytes | str, bounds: ManifestBounds | None = None) -> Manifest:
    """The text of an `aube.toml` -> a checked Manifest; bundle_invalid_manifest on any problem."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise _invalid(f"is {len(data)} bytes, more than the limit of {MAX_MANIFEST_BYTES}")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _invalid(f"not UTF-8 text ({e.reason} at byte {e.start})") from e
    try:
        raw = tomllib.loads(data)
    except tomllib.TOMLDecodeError as e:
        raise _invalid(f"not valid TOML: {e}") from e
    except RecursionError as e:  # tomllib recurses per nested array or inline table
        raise _invalid("not valid TOML: arrays or tables nest too deeply") from e
    for section, defaults in defaults_within(bounds or ManifestBounds()).items():
        given = raw.setdefault(section, {})
        if isinstance(given, dict):  # anything else is msgspec's to refuse, naming the section
            for key, value in defaults.items():
                given.setdefault(key, value)
    # A plain number of bytes is a natural way to write a size; the schema keeps the string form.
    limits = raw.get("limits")
    if isinstance(limits, dict):
        for key in ("memory", "max_message"):
            if type(limits.get(key)) is int:
                limits[key] = str(limits[key])
    env = raw.get("env")
    if isinstance(env, dict):  # msgspec's message would not name the key
        for key, value in env.items():
            if not isinstance(value, str):
                raise _invalid(f"env value of {key} must be a string, got {type(value).__name__} {value!r}")
    try:
        manifest = msgspec.convert(raw, Manifest)
    except msgspec.ValidationError as e:
        raise _invalid(str(e)) from e
    check_manifest(manifest, bounds)
    return manifest


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def check_manifest(manifest: Manifest, bounds: ManifestBounds | None = None) -> None:
    """The semantic rules the schema's types cannot express, and the operator's ranges (`bounds`)."""
    fn = manifest.function
    for digest in manifest.access.tokens_sha256:
        if not _SHA256_HEX.fullmatch(digest):
            raise _invalid(
                f"access.tokens_sha256 entries are 64 lower-case hex digits (sha256sum), got {digest[:80]!r}"
            )
    problem = check_bounds(manifest.scaling, manifest.limits, bounds or ManifestBounds())
    if problem is not None:
        raise _invalid(problem)
    problem = ping_problem(manifest.limits) or message_problem(manifest.limits)
    if problem is not None:
        raise _invalid(problem)
    if fn.runtime == "command":
        if not fn.command:
            raise _invalid('runtime "command" needs function.command, e.g. command = ["./prog"]')
        if not fn.command[0]:
            raise _invalid("function.command[0] is empty")
    elif fn.command:
        raise _invalid('function.command is only used with runtime = "command"')
    for index, arg in enumerate(fn.command):
        if "\x00" in arg:
            raise _invalid(f"function.command[{index}] contains a NUL character")
    for name, text in manifest.env.items():
        if not _ENV_NAME.fullmatch(name):
            raise _invalid(f"env key {name[:80]!r} is not a valid environment variable name")
        reserved = reserved_env_reason(name)
        if reserved is not None:
            raise _invalid(f"env key {name} is reserved: {reserved}")
        if "\x00" in text:
            raise _invalid(f"env value of {name} contains a NUL character")


# The ping policy's range: a ping more often than every second is load, not liveness, and one in an hour detects
# nothing useful.
PING_MIN = 1.0
PING_MAX = 3600.0


def message_problem(limits: LimitsSection) -> str | None:
    """What is wrong with `[limits] max_message`, or None: a size from 1 KiB to 64 MiB, and at most a quarter of the
    instance's memory (websockets holds a whole message, and a few may wait in its queue)."""
    try:
        size = memory_bytes(limits.max_message)
    except ValueError:
        return f"limits.max_message {limits.max_message[:40]!r} is not a size like '1m', '256k' or a number of bytes"
    if not MESSAGE_MIN <= size <= MESSAGE_MAX:
        return f"limits.max_message must be between 1k and 64m, got {limits.max_message}"
    try:
        memory = memory_bytes(limits.memory)
    except ValueError:
        return None  # the memory limit's own check names it
    if size > memory // 4:
        return (
            f"limits.max_message {limits.max_message} is more than a quarter of limits.memory {limits.memory}: "
            "raise the memory or lower the message size"
        )
    return None


def ping_problem(limits: LimitsSection) -> str | None:
    """What is wrong with `[limits] ping_interval` / `ping_timeout`, or None."""
    interval, timeout = limits.ping_interval, limits.ping_timeout
    for key, value in (("ping_interval", interval), ("ping_timeout", timeout)):
        if not math.isfinite(value):
            return f"limits.{key} must be a finite number, got {value:g}"
    if interval != 0 and not PING_MIN <= interval <= PING_MAX:
        return f"limits.ping_interval must be 0 (no pings) or between {PING_MIN:g} and {PING_MAX:g} s, got {interval:g}"
    if not PING_MIN <= timeout <= PING_MAX:
        return f"limits.ping_timeout must be between {PING_MIN:g} and {PING_MAX:g} s, got {timeout:g}"
    idle = limits.stream_idle_timeout
    if 0 < interval < idle:
        # The proxy sees pings as traffic (it does not parse frames): such a stream would never be idle.
        return (
            f"limits.ping_interval {interval:g} is shorter than limits.stream_idle_timeout {idle:g}: pings are"
            " traffic, so the stream would never be idle; ping less often or drop the idle timeout"
        )
    return None


def load_manifest(root: Path, bounds: ManifestBounds | None = None) -> Manifest:
    """The folder's `aube.toml`, or the defaults (within `bounds`) when it has none (AubeFaaS folders have none)."""
    path = root / MANIFEST_FILE
    if not path.exists() and not path.is_symlink():
        return parse_manifest(b"", bounds)
    if not path.is_file():
        raise _invalid("is not a regular file")
    with path.open("rb") as f:
        data = f.read(MAX_MANIFEST_BYTES + 1)
    return parse_manifest(data, bounds)


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _binds_fn(statements: list[ast.stmt]) -> bool:
    """Whether module-level code binds the name `fn` (also inside top-level if/try/with blocks)."""
    for node in statements:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == "fn":
            return True
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if isinstance(node, ast.AnnAssign) and node.value is None:
                continue
            for target in targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Name) and sub.id == "fn":
                        return True
        if isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                if bound == "fn":
                    return True
        blocks: list[list[ast.stmt]] = []
        if isinstance(node, ast.If | ast.With | ast.AsyncWith):
            blocks = [node.body, getattr(node, "orelse", [])]
        elif isinstance(node, ast.Try | ast.TryStar):
            blocks = [node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)]
        if any(_binds_fn(block) for block in blocks):
            return True
    return False


def _check_python(root: Path) -> None:
    path = root / FN_FILE
    if not path.is_file():
        found = sorted(p.name for p in root.iterdir())[:10] if root.is_dir() else []
        raise InvalidBundle(
            f"{FN_FILE} is missing: runtime python needs {FN_FILE} defining fn"
            f" (the bundle's top level holds: {', '.join(found) or 'nothing'})",
            code="bundle_missing_fn",
        )
    if not _inside(root, path):
        raise InvalidBundle(f"{FN_FILE} is a link leading outside the bundle", code="bundle_link")
    size = path.stat().st_size
    if size > MAX_FN_BYTES:
        raise InvalidBundle(
            f"{FN_FILE} is {size} bytes, more than the {MAX_FN_BYTES} bytes the platform compiles at upload;"
            " put larger code in modules beside it",
            code="bundle_too_large",
        )
    source = path.read_bytes()
    try:
        tree = ast.parse(source, filename=FN_FILE)
        # A full compile also catches what the parser lets through ('return' outside a function, ...).
        compile(tree, FN_FILE, "exec", dont_inherit=True)
    except (RecursionError, MemoryError) as e:
        # CPython's answer to deeply nested source: the parser's stack overflowing (MemoryError) or the
        # compiler's recursion limit. Both are the source's fault, not the platform's.
        message = f"{FN_FILE}: expressions or blocks nest too deeply to compile"
        raise InvalidBundle(message, code="bundle_fn_syntax") from e
    except SyntaxError as e:
        where = f"line {e.lineno}" if e.lineno else "unknown line"
        raise InvalidBundle(f"{FN_FILE} {where}: {e.msg}", code="bundle_fn_syntax") from e
    except ValueError as e:  # NUL bytes in the source
        raise InvalidBundle(f"{FN_FILE}: {e}", code="bundle_fn_syntax") from e
    if not _binds_fn(tree.body):
        raise InvalidBundle(
            f"{FN_FILE} defines no top-level fn: write `def fn(websocket)`, `async def fn(websocket)`"
            " or `async def fn(messages)` yielding replies",
            code="bundle_fn_undefined",
        )


def _check_command(root: Path, command: list[str]) -> None:
    if not command or not command[0]:
        raise _invalid('runtime "command" needs function.command, e.g. command = ["./prog"]')
    program = command[0]
    if os.path.isabs(program):
        return  # a program of the instance's system, e.g. /usr/bin/python3
    path = root / program
    if "/" not in program and not path.exists():
        return  # a bare name that is not in the folder: looked up on PATH
    if not _inside(root, path):
        raise InvalidBundle(
            f"function.command[0] {program!r} leads outside the function folder", code="bundle_unsafe_path"
        )
    if not path.is_file():
        raise _invalid(f"function.command[0] {program!r} is not a file in the function folder")


def check_function(root: Path, manifest: Manifest) -> None:
    """The folder can run under its manifest: fn.py for runtime python, the program for runtime command."""
    if manifest.function.runtime == "python":
        _check_python(root)
    else:
        _check_command(root, manifest.function.command)
