"""The operator dashboard's HTTP side: the page's three files and its state, served on the operator listener only.

`/_aube/dashboard` is the page (plain HTML, JS and CSS shipped as package data in `dashboard_files/`: no build
step, nothing fetched from elsewhere, so it works on a machine without internet); the page polls
`/_aube/dashboard/state` (JSON, the pure `dashboard_state.snapshot`) once a second. Every answer ends its connection,
like the other operator endpoints. `run` samples the counters into the ring of recent activity.

DNS rebinding: a web page a browser on this machine opens could resolve its own name to 127.0.0.1 and read the
state with the browser's help. The dashboard answers only requests whose Host is an IP address, `localhost`, or the
operator host's own name (`host_allowed`); any other name gets 403.
"""

from __future__ import annotations

import time
from importlib import resources

import anyio

from aube.proxy import dashboard_state, handshake
from aube.proxy.metrics import Metrics
from aube.proxy.pool import Pool
from aube.shared import names
from aube.shared.operator_http import host_allowed

_FILES = {
    "": ("index.html", "text/html; charset=utf-8"),
    "dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
# The page runs only its own script and style and talks only to its own origin; it must not be framed.
_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _read(filename: str) -> str:
    return resources.files("aube.proxy").joinpath("dashboard_files", filename).read_text(encoding="utf-8")


class Dashboard:
    def __init__(self, proxy_id: str, pool: Pool, metrics: Metrics, operator_host: str = "127.0.0.1") -> None:
        self.proxy_id = proxy_id
        self.operator_host = operator_host
        self.pool = pool
        self.metrics = metrics
        self.history = dashboard_state.History()
        self._files = {sub: (_read(filename), ctype) for sub, (filename, ctype) in _FILES.items()}

    def state(self) -> dashboard_state.DashboardState:
        return dashboard_state.snapshot(
            proxy_id=self.proxy_id,
            now=time.time(),
            functions={k: fn for k, fn in self.pool.functions.items()},
            instances=[e.record for e in self.pool.entries.values()],
            replica_streams=self.metrics.streams_open,
            history=self.history,
        )

    def answer(self, head: handshake.RequestHead) -> bytes | None:
        """The response to a GET or HEAD under /_aube/dashboard; None for a path it does not serve (a 404)."""
        sub = head.path.removeprefix(names.PATH_DASHBOARD).strip("/")
        head_only = head.method == "HEAD"
        if not host_allowed(head.header("host"), self.operator_host):
            message = "the dashboard answers only by address, localhost or the operator host's name\n"
            return handshake.response(403, message, headers=_HEADERS, head_only=head_only)
        if sub == "state":
            body = dashboard_state.encode(self.state()).decode("utf-8")
            return handshake.response(200, body, content_type="application/json", headers=_HEADERS, head_only=head_only)
        found = self._files.get(sub)
        if found is None:
            return None
        text, ctype = found
        return handshake.response(200, text, content_type=ctype, headers=_HEADERS, head_only=head_only)

    def sample(self) -> None:
        records = [e.record for e in self.pool.entries.values()]
        self.history.sample(
            time.time(),
            dashboard_state.counters(self.metrics),
            (rec.instance_id for rec in records),
            sum(1 for rec in records if rec.state == "busy"),
        )

    async def run(self) -> None:
        """Sample every interval until cancelled (a child of the service's task group)."""
        while True:
            self.sample()
            await anyio.sleep(self.history.interval)
