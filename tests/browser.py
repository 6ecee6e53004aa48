"""A real headless Chromium (the Debian package) driven over the Chrome DevTools Protocol with `websockets`.

Enough for a test to open a page, evaluate expressions in it and capture a screenshot; no selenium, no driver.
`chromium_or_skip` skips where no Chromium is installed, except in CI (AUBE_REQUIRE_DOCKER=1 or
AUBE_REQUIRE_BROWSER=1), where scripts/setup.sh installs it and a missing one is a failure.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from websockets.asyncio.client import ClientConnection, connect


def chromium_or_skip() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "no chromium (scripts/setup.sh installs the Debian package when run as root)"
        if "1" in (os.environ.get("AUBE_REQUIRE_DOCKER"), os.environ.get("AUBE_REQUIRE_BROWSER")):
            pytest.fail(message)
        pytest.skip(message)
    return path


class Page:
    """One page target, attached through the browser's connection (flat sessions: one WebSocket for all)."""

    def __init__(self, ws: ClientConnection, session_id: str) -> None:
        self.ws = ws
        self.session_id = session_id
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        return await _call(self.ws, self._ids, method, params, self.session_id)

    async def evaluate(self, expression: str) -> Any:
        reply = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in reply:
            raise AssertionError(f"{expression!r} raised in the page: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        """Poll `expression` until it is truthy; its value."""
        with anyio.fail_after(timeout):
            while True:
                value = await self.evaluate(expression)
                if value:
                    return value
                await anyio.sleep(0.2)

    async def screenshot(self, path: Path) -> bytes:
        data = base64.b64decode((await self.call("Page.captureScreenshot", format="png"))["data"])
        path.write_bytes(data)
        return data


async def _call(
    ws: ClientConnection, ids: itertools.count[int], method: str, params: dict[str, Any], session: str | None = None
) -> dict[str, Any]:
    msg_id = next(ids) + (1_000_000 if session else 0)  # browser and page calls never share an id
    message: dict[str, Any] = {"id": msg_id, "method": method, "params": params}
    if session:
        message["sessionId"] = session
    await ws.send(json.dumps(message))
    with anyio.fail_after(30):
        while True:  # events (no id) and other answers are skipped: calls are made one at a time
            reply = json.loads(await ws.recv())
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply.get("result", {})  # type: ignore[no-any-return]


@asynccontextmanager
async def headless_page(work: Path, width: int = 1280, height: int = 1000) -> AsyncIterator[Page]:
    """Chromium with a profile of its own under `work`, and one blank page in it; stopped after."""
    binary = chromium_or_skip()
    profile = work / "chromium-profile"
    profile.mkdir(parents=True, exist_ok=True)
    args = [
        binary,
        "--headless=new",
        "--remote-debugging-port=0",  # the port it picks is written to DevToolsActivePort in the profile
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-gpu",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox (CI runs as root)
    log = (work / "chromium.log").open("wb")
    proc = subprocess.Popen([*args, "about:blank"], stdout=log, stderr=subprocess.STDOUT)
    try:
        active = profile / "DevToolsActivePort"
        with anyio.fail_after(60):
            while not active.exists() or len(active.read_text().splitlines()) < 2:
                if proc.poll() is not None:
                    raise AssertionError(f"chromium exited:\n{(work / 'chromium.log').read_text()[-3000:]}")
                await anyio.sleep(0.1)
        port, path = active.read_text().splitlines()[:2]
        async with connect(f"ws://127.0.0.1:{port}{path}", proxy=None, max_size=64 * 2**20) as ws:
            ids = itertools.count(1)
            target = await _call(ws, ids, "Target.createTarget", {"url": "about:blank"})
            attached = await _call(ws, ids, "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
            page = Page(ws, attached["sessionId"])
            await page.call("Page.enable")
            await page.call(
                "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False
            )
            yield page
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
