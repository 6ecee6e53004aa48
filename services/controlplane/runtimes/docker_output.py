"""The Docker runtime's instances' output for `aube logs` (see output.py for the contract).

Docker keeps each container's stdout and stderr in its log (json-file, 2 x 1 MB: runtimes/docker.py); this follows
it with the engine's log API, one follow per container and stream (the API tells the streams apart only when asked
for one at a time), on a client of its own: a follow holds a connection and a worker thread for as long as the
container runs, and must take neither from the runtime's calls. The owner's running containers are listed every
LIST_EVERY seconds; who a container's output belongs to comes from its labels, which the control plane set.
The rate limit is applied in the follow's thread (`OutputGate`, one per container for both its streams): a flood of
lines (one frame each) is counted there and never reaches the event loop line by line; the count goes to
`sink.dropped` at most every REPORT_EVERY seconds, and when the container ends.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import docker
import docker.errors
import requests

from aube.controlplane.outputlimits import OutputGate
from aube.controlplane.runtimes.output import STREAMS, OutputOf, OutputSink
from aube.shared import names
from aube.shared.schemas import OutputStream

logger = logging.getLogger(__name__)

LIST_EVERY = 0.5  # seconds between listings of the owner's running containers: a new instance's first lines wait this
READ_TIMEOUT = 300  # a follow that saw nothing this long is opened again (from then on)
MAX_FOLLOWS = 512  # worker threads (two per container) and connections of the follower's client
REPORT_EVERY = 0.5  # seconds: how often a follow hands the count of lines its gate skipped to the sink


class _Gated:
    """A container's gate, shared by its two follows' threads."""

    def __init__(self, rate: float, burst: int) -> None:
        self.gate = OutputGate(rate=rate, burst=burst)
        self.lock = threading.Lock()
        self.reported = 0.0


class DockerOutput:
    def __init__(self, owner: str, sink: OutputSink, rate: float, burst: int) -> None:
        self.owner = owner
        self.sink = sink
        self.rate, self.burst = rate, burst
        self.followed: set[str] = set()
        self.limiter = anyio.CapacityLimiter(MAX_FOLLOWS)

    async def watch(self) -> None:
        client = await anyio.to_thread.run_sync(
            lambda: docker.from_env(timeout=READ_TIMEOUT, max_pool_size=MAX_FOLLOWS)
        )
        try:
            async with anyio.create_task_group() as tg:
                since: int | None = int(time.time())  # the first listing's containers: from now on
                while True:
                    try:
                        running = await anyio.to_thread.run_sync(self._running, client)
                    except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
                        logger.warning("listing containers for their output failed: %s", e)
                        running = []
                    for cid, of in running:
                        if cid not in self.followed:
                            self.followed.add(cid)
                            tg.start_soon(self._follow_container, client, cid, of, since)
                    since = None  # containers found later: from their first byte
                    await anyio.sleep(LIST_EVERY)
        finally:
            with contextlib.suppress(Exception):
                client.close()  # ends the abandoned follows' reads

    def _running(self, client: Any) -> list[tuple[str, OutputOf]]:
        labels = [f"{names.LABEL_MANAGED}=true", f"{names.LABEL_OWNER}={self.owner}"]
        found = client.api.containers(filters={"label": labels, "status": "running"})
        out = []
        for c in found:
            label = c.get("Labels") or {}
            of = OutputOf(
                function=label.get(names.LABEL_FUNCTION, ""),
                instance_id=label.get(names.LABEL_INSTANCE, ""),
                tenant=label.get(names.LABEL_TENANT, ""),
            )
            if of.function and of.instance_id:
                out.append((str(c["Id"]), of))
        return out

    async def _follow_container(self, client: Any, cid: str, of: OutputOf, since: int | None) -> None:
        gated = _Gated(self.rate, self.burst)
        try:
            async with anyio.create_task_group() as reporting:
                reporting.start_soon(self._report_dropped, of, gated)
                async with anyio.create_task_group() as tg:
                    for stream in STREAMS:
                        tg.start_soon(self._follow, client, cid, of, stream, since, gated)
                reporting.cancel_scope.cancel()  # both streams ended: the rest is reported below
        finally:
            self.followed.discard(cid)
            with gated.lock:
                dropped = gated.gate.take_dropped()
            if dropped:
                self.sink.dropped(of, dropped)
            self.sink.closed(of)

    async def _report_dropped(self, of: OutputOf, gated: _Gated) -> None:
        """Report what the gate dropped every REPORT_EVERY seconds, also once a flood has ended and no chunk comes
        to carry the count (a 3000-line flood showed 41 lines and reported 1 dropped until the container ended)."""
        while True:
            await anyio.sleep(REPORT_EVERY)
            with gated.lock:
                dropped = gated.gate.take_dropped()
                gated.reported = time.time()
            if dropped:
                self.sink.dropped(of, dropped)

    async def _follow(
        self, client: Any, cid: str, of: OutputOf, stream: OutputStream, since: int | None, gated: _Gated
    ) -> None:
        sink = self.sink

        def ship(chunk: bytes) -> None:
            now = time.time()
            with gated.lock:
                data = gated.gate.admit(stream, chunk, now)
                dropped = 0
                if now - gated.reported >= REPORT_EVERY:
                    dropped, gated.reported = gated.gate.take_dropped(), now
            if data:
                anyio.from_thread.run_sync(sink.write, of, stream, data)
            if dropped:
                anyio.from_thread.run_sync(sink.dropped, of, dropped)

        def pump() -> None:
            start = since
            while True:
                try:
                    chunks = client.api.logs(
                        cid, stdout=stream == "stdout", stderr=stream == "stderr", stream=True, follow=True,
                        since=start,
                    )  # fmt: skip
                    for chunk in chunks:
                        ship(chunk)
                except (docker.errors.NotFound, anyio.RunFinishedError):
                    return
                except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as e:
                    logger.debug("following %s's %s ended: %s", cid[:12], stream, e)
                # The follow ends with the container, or after READ_TIMEOUT of silence: then again from now on.
                start = int(time.time())
                try:
                    if not client.api.inspect_container(cid)["State"]["Running"]:
                        return
                except (docker.errors.DockerException, requests.exceptions.RequestException, OSError, KeyError):
                    return

        # abandon_on_cancel: the thread blocks in a read; closing the client (watch's finally) ends it.
        await anyio.to_thread.run_sync(pump, limiter=self.limiter, abandon_on_cancel=True)
