"""`aube new <folder> [--style ...]`: a working function folder to start from.

The folder's `aube.toml` lists every manifest key with its default, each commented out so the platform's own
defaults apply (a key left out is moved into the operator's range; one that is set is checked, never moved) and
a user uncomments what to change. The keys and their defaults are read from the manifest schema
(`aube.shared.schemas.Manifest`), never copied, so the template cannot drift from what the parser accepts;
`KEY_HELP` must describe exactly the schema's keys, or writing a template fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Literal, get_args

import msgspec

from aube.shared import names
from aube.shared.errors import AubeError, InvalidRequest
from aube.shared.schemas import Manifest

Style = Literal["sync", "async", "generator", "command"]
STYLES: tuple[Style, ...] = get_args(Style)

MANIFEST_FILE = "aube.toml"
COMMAND_PROGRAM = "main.py"

# One line for every key of every section of the schema; a key the schema gains without a line here is an error.
KEY_HELP: dict[str, dict[str, str]] = {
    "function": {
        "runtime": '"python" (fn.py) or "command": any executable, one process per stream (websocketd-style)',
        "command": 'runtime "command" only: the program and its arguments, e.g. ["./prog"]',
        "mode": 'runtime "command": "lines" (text message <-> stdin/stdout line) or "binary" (raw bytes)',
    },
    "scaling": {
        "min_free": "warm, unclaimed instances kept ready, also without traffic (0 = scale to zero)",
        "max_instances": "hard cap on this function's instances (one stream each)",
        "idle_timeout": "seconds an instance may stay free before it is stopped (min_free are kept)",
        "fresh_per_stream": "true: a new instance for every stream instead of reusing one",
    },
    "limits": {
        "memory": 'per instance: "256m", "1g", "512Mi" or bytes (k, m, g, t are binary multiples)',
        "cpus": "CPU share per instance",
        "pids": "processes and threads per instance",
        "stream_idle_timeout": "seconds without traffic either way before a stream is closed; 0 = never",
        "stream_max_duration": "seconds a stream may last; 0 = unlimited",
        "ping_interval": "seconds between the instance's pings to the client; 0 = no pings",
        "ping_timeout": "seconds a pong may take before the stream is ended",
        "max_message": "largest message a client may send; a larger one ends the stream with 1009",
    },
    "access": {
        "tokens_sha256": "SHA-256 hex digests of the bearer tokens that may open a stream; empty = public",
    },
}
SECTION_HELP = {
    "function": "How the function runs.",
    "scaling": "How many instances, and for how long.",
    "limits": "What one instance and one stream may use; each value must lie in the operator's range.",
    "env": 'Plain environment variables for the function, e.g. GREETING = "hello" (AUBE_*, PATH, ... are reserved).',
    "access": 'Who may open a stream. Add a token\'s digest with: printf %s "$TOKEN" | sha256sum',
}

FN_SOURCES: dict[Style, str] = {
    "sync": '''"""An Aube function, synchronous style: `websocket` is a websockets.sync server connection.
Every message comes back reversed. Deploy it with `aube deploy <this folder> <name>`, try it with `aube connect <name>`.
Needs a package from PyPI? List it in requirements.txt beside this file."""


def fn(websocket):
    for message in websocket:
        websocket.send(message[::-1])
''',
    "async": '''"""An Aube function, asyncio style: `websocket` is a websockets.asyncio server connection.
Every message comes back reversed. Deploy it with `aube deploy <this folder> <name>`, try it with `aube connect <name>`.
Needs a package from PyPI? List it in requirements.txt beside this file."""


async def fn(websocket):
    async for message in websocket:
        await websocket.send(message[::-1])
''',
    "generator": '''"""An Aube function, async generator style: it receives the stream's messages, and every value
it yields is sent back; returning closes the stream with 1000. Every message comes back reversed.
Deploy it with `aube deploy <this folder> <name>`, try it with `aube connect <name>`.
Needs a package from PyPI? List it in requirements.txt beside this file."""


async def fn(messages):
    async for message in messages:
        yield message[::-1]
''',
}

COMMAND_SOURCE = '''"""An Aube function, command runtime: one process per stream; every text message arrives as a
line on stdin, and every line printed is sent back (flushed at once). Every line comes back reversed."""

import sys

for line in sys.stdin:
    print(line.rstrip("\\n")[::-1], flush=True)
'''
COMMAND_ARGV = ["python3", "-u", COMMAND_PROGRAM]


def toml_value(value: Any) -> str:
    """A default as TOML: whole floats without their `.0` (`idle_timeout = 900`), strings and lists as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # the defaults are plain ASCII: a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for a default of type {type(value).__name__}")


def schema_defaults() -> dict[str, dict[str, Any]]:
    """Every manifest key with its default, by section, from the schema itself ([env] has no keys)."""
    defaults = msgspec.to_builtins(Manifest())
    assert isinstance(defaults, dict)
    return {section: values for section, values in defaults.items() if section != "env"}


def manifest_template(style: Style) -> str:
    """The `aube.toml` of a new folder of `style`: every key with its default, commented out; what the style itself
    needs (the command runtime's `runtime` and `command`) is set on the line after its default."""
    defaults = schema_defaults()
    if {s: set(keys) for s, keys in defaults.items()} != {s: set(keys) for s, keys in KEY_HELP.items()}:
        raise AssertionError("KEY_HELP does not describe exactly the manifest schema's keys")
    active: dict[str, Any] = {"runtime": "command", "command": COMMAND_ARGV} if style == "command" else {}
    lines = [
        "# The function's settings. Every key is shown with its default, commented out: the platform's defaults",
        "# apply until you uncomment a key and change it. Reference: docs/contract.md, 'Function folder'.",
    ]
    for section in Manifest.__struct_fields__:
        lines += ["", f"# {SECTION_HELP[section]}", f"[{section}]"]
        if section == "env":
            continue
        width = max(len(f"# {key} = {toml_value(value)}") for key, value in defaults[section].items())
        for key, value in defaults[section].items():
            setting = f"# {key} = {toml_value(value)}"
            lines.append(f"{setting:<{width}}  # {KEY_HELP[section][key]}")
            if section == "function" and key in active:
                lines.append(f"{key} = {toml_value(active[key])}")
    return "\n".join(lines) + "\n"


def template_files(style: Style) -> dict[str, str]:
    """File name -> text of a new function folder of `style`. No requirements.txt: the templates need nothing but
    the platform's own websockets (the docstrings say where packages go)."""
    if style == "command":
        return {COMMAND_PROGRAM: COMMAND_SOURCE, MANIFEST_FILE: manifest_template(style)}
    return {"fn.py": FN_SOURCES[style], MANIFEST_FILE: manifest_template(style)}


def create_function_folder(folder: Path, style: Style) -> list[str]:
    """Write a new function folder (created with its parents when missing); the names of the files written.
    An existing folder must be empty: nothing of a user's is ever overwritten."""
    if style not in STYLES:
        raise InvalidRequest(f"unknown style {style!r}: use one of {', '.join(STYLES)}")
    if folder.exists() or folder.is_symlink():
        if not folder.is_dir():
            raise InvalidRequest(f"{folder} exists and is not a folder")
        if any(folder.iterdir()):
            raise InvalidRequest(f"{folder} exists and is not empty: aube new writes only into a new or empty folder")
    files = template_files(style)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        with (folder / name).open("x", encoding="utf-8") as f:  # "x": never replace a file that appeared meanwhile
            f.write(text)
    return sorted(files)


def next_steps(folder: Path, style: Style, written: list[str]) -> str:
    """What `aube new` prints: what it wrote and the commands to deploy and try it."""
    name = folder.resolve().name
    if not names.NAME_PATTERN.fullmatch(name):
        name = "<name>"
    return (
        f"created {folder} ({style} style): {', '.join(written)}\n"
        f"deploy it:  aube deploy {folder} {name}\n"
        f"try it:     aube connect {name}"
    )


def new_main(args: argparse.Namespace) -> int:
    """`aube new`: write the folder and say what to do next."""
    folder = Path(args.folder)
    try:
        written = create_function_folder(folder, args.style)
    except (AubeError, OSError) as e:
        message = e.message if isinstance(e, AubeError) else f"cannot write {folder}: {e}"
        print(f"error: invalid_request: {message}", file=sys.stderr)
        return 1
    print(next_steps(folder, args.style, written))
    return 0


def add_parser(sub: Any) -> None:
    """The `new` subcommand's arguments."""
    n = sub.add_parser("new", help="write a new function folder to start from (fn.py or a program, aube.toml)")
    n.add_argument("folder", help="a folder that does not exist yet, or an empty one")
    n.add_argument("--style", choices=STYLES, default="sync", help="the handler style (default: sync)")
