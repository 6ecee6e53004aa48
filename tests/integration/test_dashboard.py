"""The operator dashboard in a real headless Chromium, against a real platform (process runtime).

The page is served by the proxy's operator listener only; it shows a deployed function, then a client's stream live
(the page polls its state: no reload), and its screenshot is a real picture. The state it reads names no secret.
"""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
from browser import headless_page
from harness import deploy, nats_client, wait_free
from PIL import Image
from websockets.asyncio.client import connect

from aube.shared import names

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MARKER = "window.__aubeNoReload"  # set once in the page: still there later means the page never reloaded


async def http_get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    async with await anyio.connect_tcp("127.0.0.1", port) as s:
        await s.send(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        with anyio.fail_after(10):
            while True:
                try:
                    data += await s.receive()
                except anyio.EndOfStream:
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def rows(table: str, selector: str = "") -> str:
    """A page expression: the rows of the table body `table` matching `selector`, as [data-instance or text]."""
    return f"[...document.querySelectorAll('#{table} tr{selector}')].map(r => r.dataset.instance || r.textContent)"


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_dashboard_shows_functions_and_streams_live_in_chromium(platform, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    await platform.start_controlplane()
    port, proxy = await platform.start_proxy()
    operator = int(proxy.env["AUBE_OPERATOR_PORT"])
    url = f"http://127.0.0.1:{operator}{names.PATH_DASHBOARD}"
    async with nats_client(platform.nats_url) as (nc, registry):
        await deploy(nc, "who", EXAMPLES / "whoami", {"aube.toml": "[scaling]\nmin_free = 1\nmax_instances = 3\n"})
        free = await wait_free(registry, "who", 1)
        secrets = {e.record.secret for e in await registry.instances("who")}
        assert all(secrets)

        # Not on the public port: the dashboard names every function, like the metrics.
        for path in (names.PATH_DASHBOARD, names.PATH_DASHBOARD + "/state"):
            assert (await http_get(port, path))[0] == 404
            # Nor to a page that resolved a name of its own to 127.0.0.1 (DNS rebinding).
            status, body = await http_get(operator, path, host=f"rebound.example:{operator}")
            assert status == 403 and b"who" not in body

        async with headless_page(tmp_path) as page:
            await page.call("Page.navigate", url=url)
            assert await page.wait_for(rows("functions", '[data-function="who"]') + ".length") == 1
            await page.evaluate(f"{MARKER} = 42")
            assert await page.evaluate(rows("streams") + "[0]") == "no open streams"

            async with connect(f"ws://127.0.0.1:{port}/who", proxy=None, open_timeout=60) as client:
                await client.send("hi")
                instance = json.loads(await client.recv())["instance"]
                assert instance in {e.record.instance_id for e in free}
                # The open stream appears without a reload: the page polls its state.
                shown = await page.wait_for(rows("streams", '[data-function="who"]') + ".join(' ')")
                assert shown == instance
                assert await page.evaluate(MARKER) == 42
                assert await page.evaluate("document.getElementById('total-streams').textContent") == "1"
                # The claim, and the instance started for the deploy, reach the charts within a sample or two.
                await page.wait_for("Number(document.getElementById('sum-claims').textContent) >= 1")
                await page.wait_for("Number(document.getElementById('sum-cold_starts').textContent) >= 1")
                # The scale-out for min_free = 1 shows up as a second instance, a new cold start.
                await page.wait_for(rows("instances") + ".length >= 2", timeout=60)

                status, body = await http_get(operator, names.PATH_DASHBOARD + "/state")
                assert status == 200
                secrets |= {e.record.secret for e in await registry.instances("who")}
                for secret in secrets:
                    assert secret.encode() not in body
                state = json.loads(body)
                assert state["totals"]["open_streams"] == 1

                shot = tmp_path / "dashboard.png"
                await page.screenshot(shot)

            # And the stream's end too.
            await page.wait_for(rows("streams") + "[0] === 'no open streams'")
            assert await page.evaluate(MARKER) == 42
            assert int(await page.evaluate("document.body.dataset.updates")) >= 3

    with Image.open(shot) as img:
        img.verify()  # a well-formed PNG (verify leaves the image unusable: open it again)
    with Image.open(shot) as img:
        assert img.format == "PNG" and img.size == (1280, 1000)
        colours = img.convert("RGB").getcolors(maxcolors=1_000_000)
        assert colours is None or len(colours) > 20, "the screenshot is (nearly) one colour"
        # Text rendered: a good share of the picture is neither the page's background nor the header's.
        assert colours is None or max(n for n, _ in colours) < 0.9 * img.size[0] * img.size[1]
