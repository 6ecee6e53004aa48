"""Loading `fn.py`, telling its handler style, and the close reason a failing handler leaves behind.

Styles (detected from `fn` itself, never declared):
- "sync": `def fn(websocket)` gets a `websockets.sync` server connection and runs in the connection's thread.
- "async": `async def fn(websocket)` gets the `websockets.asyncio` server connection.
- "generator": `async def fn(messages)` with `yield`: gets an async iterator of incoming messages; each value
  it yields is sent; when it returns the stream closes normally.

Only the standard library and websockets here: this module ships into every function image.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from websockets.asyncio.server import ServerConnection
from websockets.typing import Data

Style = Literal["sync", "async", "generator"]

# RFC 6455 5.5: a control frame carries at most 125 bytes, two of them the close code.
MAX_REASON_BYTES = 123


class LoadError(Exception):
    """fn.py is missing, does not import, or does not define a usable `fn`."""


@dataclass(frozen=True)
class LoadedFunction:
    fn: Callable[..., Any]
    style: Style
    # None: accept whatever the client offers first; a list: negotiate from it as websockets' server does.
    subprotocols: list[str] | None


def detect_style(fn: object) -> Style:
    if not callable(fn):
        raise LoadError(f"fn must be callable, not {type(fn).__name__}")
    # A callable object counts by its __call__; inspect already sees through functools.partial.
    target: object = fn if inspect.isroutine(fn) or inspect.isclass(fn) else type(fn).__call__
    if inspect.isasyncgenfunction(target):
        return "generator"
    if inspect.iscoroutinefunction(target):
        return "async"
    return "sync"


def load_function(fn_dir: Path, module_name: str = "fn") -> LoadedFunction:
    """Import `fn_dir/fn.py` as `module_name`, with `fn_dir` first on sys.path for its sibling modules."""
    path = fn_dir / "fn.py"
    if not path.is_file():
        raise LoadError(f"no fn.py in {fn_dir}")
    folder = str(fn_dir)
    if folder in sys.path:
        sys.path.remove(folder)
    sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - only for exotic file systems
        raise LoadError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise LoadError(f"importing {path} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, "fn", None)
    if fn is None:
        raise LoadError(f"{path} defines no `fn`")
    style = detect_style(fn)
    subprotocols = getattr(module, "subprotocols", None)
    if subprotocols is not None:
        if isinstance(subprotocols, str) or not isinstance(subprotocols, Sequence):
            raise LoadError("`subprotocols` in fn.py must be a list of strings")
        if not all(isinstance(s, str) and s for s in subprotocols):
            raise LoadError("`subprotocols` in fn.py must be a list of non-empty strings")
        subprotocols = list(subprotocols)
    return LoadedFunction(fn=fn, style=style, subprotocols=subprotocols)


def close_reason(text: str) -> str:
    """`text` cut to fit a close frame, never in the middle of a UTF-8 sequence."""
    data = text.encode("utf-8", errors="replace")
    if len(data) <= MAX_REASON_BYTES:
        return text
    ellipsis = "…".encode()
    return data[: MAX_REASON_BYTES - len(ellipsis)].decode("utf-8", errors="ignore") + "…"


def exception_reason(exc: BaseException) -> str:
    message = str(exc)
    return close_reason(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)


async def run_async(fn: Callable[..., Any], connection: ServerConnection) -> None:
    await fn(connection)


async def run_generator(fn: Callable[..., Any], connection: ServerConnection) -> None:
    async def incoming() -> AsyncGenerator[Data, None]:
        async for message in connection:
            yield message

    messages = incoming()
    outgoing = fn(messages)
    try:
        async for reply in outgoing:
            await connection.send(reply)
    finally:
        # Finalise both generators here, in this task, rather than whenever the loop's hooks get to them.
        try:
            await outgoing.aclose()
        finally:
            await messages.aclose()
