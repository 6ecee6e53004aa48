"""requirements.txt holds requirement specifiers only (aube.controlplane.requirements), without pip or a server."""

from __future__ import annotations

from pathlib import Path

import pytest

from aube.controlplane.requirements import (
    MAX_BYTES,
    MAX_REQUIREMENTS,
    digest,
    load_requirements,
    parse_requirements,
    render,
)
from aube.shared.errors import InvalidBundle

ALLOWED = """\
# the function's dependencies
websockets>=12.0

numpy==1.26.4  # pinned
Requests[socks, security] >= 2.31, < 3 ; python_version >= "3.11"
msgspec~=0.18; sys_platform == "linux" and platform_machine != "armv7l"
a.b_c-d
"""


def test_specifiers_comments_and_blank_lines_are_accepted_and_rendered_normalized() -> None:
    found = parse_requirements(ALLOWED)
    assert [r.name for r in found] == ["websockets", "numpy", "Requests", "msgspec", "a.b_c-d"]
    assert render(found).splitlines() == [
        "websockets>=12.0",
        "numpy==1.26.4",
        'Requests[security,socks]<3,>=2.31; python_version >= "3.11"',
        'msgspec~=0.18; sys_platform == "linux" and platform_machine != "armv7l"',
        "a.b_c-d",
    ]
    assert parse_requirements(b"\xef\xbb\xbfwebsockets\r\n") == parse_requirements("websockets")  # BOM, CRLF
    assert parse_requirements("") == [] and parse_requirements("# nothing\n\n   \n") == []


REFUSED = {
    "-r /etc/passwd": "pip options",
    "--requirement=/etc/passwd": "pip options",
    "-c /etc/passwd": "pip options",
    "-e .": "pip options",
    "-i https://127.0.0.1/simple": "pip options",
    "--index-url http://user:pass@127.0.0.1/simple": "pip options",
    "--extra-index-url=http://127.0.0.1/simple": "pip options",
    "--no-binary evilpkg": "pip options",
    "--no-binary=:all:": "pip options",
    "--find-links ./links": "pip options",
    "-f links": "pip options",
    "--trusted-host 127.0.0.1": "pip options",
    "--pre": "pip options",
    "\t--no-binary evilpkg": "pip options",
    "evilpkg --config-settings=x=y": "pip options",
    "evilpkg --hash=sha256:00": "pip options",
    "websockets==${AUBE_NATS_URL}": "environment variables",
    "websockets===${AUBE_NATS_URL}": "environment variables",
    "${HOME}": "environment variables",
    "pkg @ file:///etc/passwd": "'name @ url'",
    "pkg @ https://127.0.0.1/pkg-1.0.tar.gz": "'name @ url'",
    "git+https://127.0.0.1/x.git": "URLs and paths",
    "https://127.0.0.1/pkg-1.0-py3-none-any.whl": "URLs and paths",
    "./local/path": "URLs and paths",
    "/abs/path": "URLs and paths",
    "links/evilpkg-1.0.tar.gz": "URLs and paths",
    "~/pkg": "URLs and paths",
    ".": "URLs and paths",
    "evilpkg-1.0.tar.gz": "a file name",
    "evilpkg-1.0-py3-none-any.whl": "a file name",
    "pkg.zip": "a file name",
    'evilpkg; os_name == " --no-binary evilpkg"': "a marker may not",
    "websockets \\": "line continuations",
    "pkg==1.0 extra words": "not a requirement",
    "pkg#frag": "not a requirement",
    "pkg==": "not a requirement",
}


@pytest.mark.parametrize("line", list(REFUSED))
def test_everything_else_is_refused_naming_the_line(line: str) -> None:
    with pytest.raises(InvalidBundle) as caught:
        parse_requirements(f"# deps\nwebsockets>=12\n{line}\nmsgspec\n")
    error = caught.value
    assert error.code == "bundle_invalid_requirements"
    assert error.message.startswith("requirements.txt line 3 "), error.message
    assert REFUSED[line] in error.message, error.message


def test_messages_quote_a_bounded_part_of_the_line() -> None:
    with pytest.raises(InvalidBundle) as caught:
        parse_requirements("-r " + "x" * 10_000)
    assert len(caught.value.message) < 400


def test_size_encoding_nul_and_count_are_bounded() -> None:
    for data, why in (
        (b"a" * (MAX_BYTES + 1), "over the limit"),
        (b"websockets\xff\n", "not UTF-8"),
        (b"websockets\x00\n", "NUL"),
        ("\n".join(f"pkg{i}" for i in range(MAX_REQUIREMENTS + 1)).encode(), "more than"),
    ):
        with pytest.raises(InvalidBundle, match=why) as caught:
            parse_requirements(data)
        assert caught.value.code == "bundle_invalid_requirements"


def test_line_numbers_follow_newlines_only() -> None:
    # pip's splitlines() would also split at \x0b, \x0c, \x1c..\x1e, \x85, \u2028: such a "line" is one line here
    # and must still be refused as a whole, never seen as a harmless requirement plus a hidden option.
    for sep in ("\x0b", "\x0c", "\x1c", "\x85", "\u2028"):
        with pytest.raises(InvalidBundle) as caught:
            parse_requirements(f"websockets{sep}--no-binary evilpkg\n")
        assert "line 1" in caught.value.message


def test_digest_ignores_order_comments_and_spelling_but_not_versions() -> None:
    a = parse_requirements("websockets>=12\nmsgspec\n")
    b = parse_requirements("# x\nmsgspec  \n\nwebsockets >= 12\n")
    c = parse_requirements("websockets>=13\nmsgspec\n")
    assert digest(a) == digest(b) != digest(c)


def test_load_requirements_needs_a_regular_file_inside_the_folder(tmp_path: Path) -> None:
    fn = tmp_path / "fn"
    fn.mkdir()
    assert load_requirements(fn) == []
    (fn / "requirements.txt").write_text("websockets\n")
    assert [r.name for r in load_requirements(fn)] == ["websockets"]
    (fn / "requirements.txt").unlink()
    (fn / "requirements.txt").mkdir()
    with pytest.raises(InvalidBundle, match="not a regular file"):
        load_requirements(fn)
    (fn / "requirements.txt").rmdir()
    (tmp_path / "outside.txt").write_text("websockets\n")
    (fn / "requirements.txt").symlink_to(tmp_path / "outside.txt")
    with pytest.raises(InvalidBundle, match="not a regular file"):
        load_requirements(fn)
