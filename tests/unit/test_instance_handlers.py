"""Loading fn.py, telling handler styles apart, close reasons; and what the instance package may import."""

from __future__ import annotations

import ast
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from aube.instance import command
from aube.instance.handlers import (
    MAX_REASON_BYTES,
    LoadError,
    close_reason,
    detect_style,
    exception_reason,
    load_function,
)

INSTANCE_DIR = Path(__file__).resolve().parents[2] / "services" / "instance"


def sync_fn(websocket: Any) -> None:
    pass


async def async_fn(websocket: Any) -> None:
    pass


async def gen_fn(messages: AsyncIterator[str]) -> AsyncIterator[str]:
    async for m in messages:
        yield m


class AsyncCallable:
    async def __call__(self, websocket: Any) -> None:
        pass


class SyncCallable:
    def __call__(self, websocket: Any) -> None:
        pass


def test_detect_style() -> None:
    assert detect_style(sync_fn) == "sync"
    assert detect_style(async_fn) == "async"
    assert detect_style(gen_fn) == "generator"
    assert detect_style(AsyncCallable()) == "async"
    assert detect_style(SyncCallable()) == "sync"
    with pytest.raises(LoadError):
        detect_style(42)


def test_close_reason_fits_and_stays_valid_utf8() -> None:
    assert close_reason("short") == "short"
    exact = "x" * MAX_REASON_BYTES
    assert close_reason(exact) == exact
    for text in ("é" * 200, "x" + "✓" * 100, "🙂" * 60):
        reason = close_reason(text)
        data = reason.encode()
        assert len(data) <= MAX_REASON_BYTES
        assert data.decode() == reason
        assert reason.endswith("…")


def test_exception_reason() -> None:
    assert exception_reason(ValueError("bad input")) == "ValueError: bad input"
    assert exception_reason(KeyError()) == "KeyError"
    assert len(exception_reason(RuntimeError("x" * 500)).encode()) <= MAX_REASON_BYTES


@pytest.fixture
def clean_import(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """load_function puts the folder on sys.path and registers a module: undo both."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


def _folder(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    return tmp_path


@pytest.mark.usefixtures("clean_import")
def test_load_imports_sibling_modules_and_subprotocols(tmp_path: Path) -> None:
    folder = _folder(
        tmp_path,
        {
            "helper_mod_x1.py": "SUFFIX = '!'\n",
            "fn.py": """
                from helper_mod_x1 import SUFFIX
                subprotocols = ("v2", "v1")
                async def fn(messages):
                    async for m in messages:
                        yield m + SUFFIX
            """,
        },
    )
    loaded = load_function(folder, module_name="fn_test_a")
    assert loaded.style == "generator"
    assert loaded.subprotocols == ["v2", "v1"]
    assert sys.path[0] == str(folder)


@pytest.mark.usefixtures("clean_import")
def test_load_without_subprotocols(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"fn.py": "def fn(websocket):\n    pass\n"})
    loaded = load_function(folder, module_name="fn_test_b")
    assert (loaded.style, loaded.subprotocols) == ("sync", None)


@pytest.mark.usefixtures("clean_import")
@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "no fn.py"),
        ({"fn.py": "x = 1\n"}, "defines no `fn`"),
        ({"fn.py": "def fn(:\n"}, "SyntaxError"),
        ({"fn.py": "import no_such_module_zz\n"}, "ModuleNotFoundError"),
        ({"fn.py": "fn = 3\n"}, "callable"),
        ({"fn.py": "subprotocols = 'chat'\ndef fn(ws): pass\n"}, "list of strings"),
        ({"fn.py": "subprotocols = ['']\ndef fn(ws): pass\n"}, "non-empty"),
    ],
)
def test_load_errors(tmp_path: Path, files: dict[str, str], message: str) -> None:
    folder = _folder(tmp_path, files)
    with pytest.raises(LoadError, match=message):
        load_function(folder, module_name="fn_test_c")


def test_split_lines() -> None:
    buffer = bytearray(b"one\r\ntwo\n\nthree")
    assert command.split_lines(buffer) == [b"one", b"two", b""]
    assert buffer == b"three"
    big = bytearray(b"x" * command.MAX_LINE)
    assert command.split_lines(big) == [b"x" * command.MAX_LINE]
    assert big == b""


def test_exit_reason() -> None:
    assert command.exit_reason(3) == "command exited with status 3"
    assert command.exit_reason(-9) == "command killed by SIGKILL"


def test_instance_imports_only_stdlib_and_websockets() -> None:
    """The function image carries websockets and these files, nothing else of ours or of PyPI."""
    allowed = set(sys.stdlib_module_names) | {"websockets", "__future__"}
    for path in sorted(INSTANCE_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                ok = module.split(".")[0] in allowed or module == "aube.instance" or module.startswith("aube.instance.")
                assert ok, f"{path.name} imports {module}"
