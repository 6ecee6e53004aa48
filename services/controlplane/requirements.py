"""What a function's requirements.txt may say: requirement specifiers, nothing else.

Pure logic over text, plus `load_requirements`, which reads the file of a folder already on disk.

pip reads a requirements file as a little command language: `-r`/`-c` read other files, `-e`, paths and
`name @ url` install from anywhere, `--no-binary` with `--find-links` builds an sdist (running its build backend),
`--index-url` picks the index, `${VAR}` expands the environment. A deployer is untrusted, so none of that is
allowed: each line is a comment, a blank, or one PEP 508 requirement (name, extras, version specifiers, markers)
parsed by `packaging`. pip is then given a file the platform writes itself from the parsed requirements
(`render`), never the deployer's file.

Every refusal is InvalidBundle with code `bundle_invalid_requirements`, naming the line number and its text
(cut to a bounded length).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

from aube.shared.errors import InvalidBundle

REQUIREMENTS_FILE = "requirements.txt"
CODE = "bundle_invalid_requirements"
MAX_BYTES = 64 * 1024
MAX_REQUIREMENTS = 256
_QUOTE_CHARS = 80  # how much of an offending line a message quotes

# pip's own comment rule: "#" at the start of a line or after whitespace starts a comment.
_COMMENT = re.compile(r"(^|\s+)#.*$")
# Archive names pip takes for a local file when a "requirement" looks like one (`evilpkg-1.0.tar.gz`).
_ARCHIVE_SUFFIXES = (
    ".whl", ".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tar.xz", ".txz", ".tlz", ".tar.lz", ".tar.lzma",
)  # fmt: skip
# Once rendered, no token of a line may start with "-" (pip would read it as an option of the requirement), and
# nothing pip treats specially may appear: "$" (variable expansion), "\" (continuation), "#" (comment).
_OPTION_TOKEN = re.compile(r"(^|\s)-")
_SPECIAL = ("$", "\\", "#")


def _quote(text: str) -> str:
    return repr(text if len(text) <= _QUOTE_CHARS else text[:_QUOTE_CHARS] + "...")


def _refuse(number: int, line: str, why: str) -> InvalidBundle:
    return InvalidBundle(f"{REQUIREMENTS_FILE} line {number} {_quote(line)}: {why}", code=CODE)


def _why_not_a_requirement(line: str) -> str:
    """The clearest reason a non-comment line that packaging refused (or that we refuse) is not allowed."""
    if line.startswith("-") or _OPTION_TOKEN.search(line):
        return "pip options (-r, -c, -e, -i, --find-links, --no-binary, ...) are not allowed; only requirements"
    if "${" in line or "$" in line:
        return "environment variables are not expanded; only requirements like 'name>=1.0'"
    if "://" in line or line.startswith(("/", ".", "~")) or "/" in line:
        return "URLs and paths are not allowed; only requirements from the package index, like 'name>=1.0'"
    return "not a requirement like 'name', 'name[extra]>=1.0' or 'name==1.2; python_version >= \"3.11\"'"


def parse_line(number: int, raw: str) -> Requirement | None:
    """One line of requirements.txt: None for a comment or a blank line, the Requirement, or the refusal."""
    if raw.rstrip().endswith("\\"):
        # pip joins a line ending in "\" with the next: refused rather than reinterpreted.
        raise _refuse(number, raw.strip(), "line continuations ('\\' at the end) are not allowed")
    line = _COMMENT.sub("", raw).strip()
    if not line:
        return None
    if line.startswith("-") or any(c in line for c in _SPECIAL):
        raise _refuse(number, line, _why_not_a_requirement(line))
    try:
        requirement = Requirement(line)
    except InvalidRequirement:
        raise _refuse(number, line, _why_not_a_requirement(line)) from None
    if requirement.url is not None:
        raise _refuse(number, line, "'name @ url' requirements are not allowed; only requirements from the index")
    if requirement.name.lower().endswith(_ARCHIVE_SUFFIXES):
        raise _refuse(number, line, "a file name is not allowed; only requirements from the package index")
    rendered = str(requirement)
    if _OPTION_TOKEN.search(rendered) or any(c in rendered for c in _SPECIAL):
        raise _refuse(number, line, "a marker may not hold '-' after a space, '$', '\\' or '#'")
    return requirement


def parse_requirements(data: bytes | str) -> list[Requirement]:
    """Every requirement of a requirements.txt, in order; bundle_invalid_requirements for anything else."""
    if isinstance(data, bytes):
        if len(data) > MAX_BYTES:
            raise InvalidBundle(f"{REQUIREMENTS_FILE} is over the limit of {MAX_BYTES} bytes", code=CODE)
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise InvalidBundle(f"{REQUIREMENTS_FILE} is not UTF-8 text (byte {e.start})", code=CODE) from e
    if "\x00" in data:
        raise InvalidBundle(f"{REQUIREMENTS_FILE} contains a NUL character", code=CODE)
    found: list[Requirement] = []
    # Only "\n" (and "\r\n") end a line here: pip's splitlines() would also split at "\x0b", "\x85"... and so see
    # a line the check did not; such characters simply make the line unparsable.
    for number, raw in enumerate(data.split("\n"), start=1):
        requirement = parse_line(number, raw.removesuffix("\r"))
        if requirement is not None:
            found.append(requirement)
            if len(found) > MAX_REQUIREMENTS:
                raise _refuse(number, raw.strip(), f"more than {MAX_REQUIREMENTS} requirements")
    return found


def render(requirements: list[Requirement]) -> str:
    """The requirements file pip is given: one normalized requirement per line, written by the platform."""
    return "".join(f"{r}\n" for r in requirements)


def digest(requirements: list[Requirement]) -> str:
    """Key of an installed set: the same requirements in any order, with any comments, give the same key.

    The "v2" salt keeps sets installed before requirements were checked (when pip ran sdists as root on the host)
    from ever being reused.
    """
    wanted = sorted(str(r) for r in requirements)
    return hashlib.sha256("\n".join(["aube-requirements-v2", *wanted]).encode()).hexdigest()[:16]


def load_requirements(root: Path) -> list[Requirement]:
    """The requirements of the function folder `root` (none without a requirements.txt); the file must be a
    regular file inside the folder (the bundle's link checks already keep links inside)."""
    path = root / REQUIREMENTS_FILE
    if not path.exists() and not path.is_symlink():
        return []
    try:
        inside = path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a link loop
        inside = False
    if not inside or not path.is_file():
        raise InvalidBundle(f"{REQUIREMENTS_FILE} is not a regular file in the function folder", code=CODE)
    with path.open("rb") as f:
        data = f.read(MAX_BYTES + 1)
    return parse_requirements(data)
