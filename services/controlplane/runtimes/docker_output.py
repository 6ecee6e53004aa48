"""The Docker runtime's instances' output for `aube logs` (see output.py for the contract).

Docker keeps each container's stdout and stderr in its log (json-file, 2 x 1 MB: runtimes/docker.py); this follows
it with the engine's log API, one follow per container and stream (the API tells the streams apart only when asked
for one at a time), on a client of its own: a follow holds a connection and a worker thread for as long as the
container runs, and must take neither from the runtime's calls. The owner's running containers are listed every
LIST_EVERY seconds; who a container's output belongs to comes from its labels, which the control plane set.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import docker
import docker.errors
import requests

from aube.controlplane.runtimes.output import STREAMS, OutputOf, OutputSink
from aube.shared import names
from aube.shared.schemas import OutputStream

logger = logging.getLogger(__name__)

LIST_EVERY = 0.5  # seconds between listings of the owner's running containers: a new instance's first lines wait this
READ_TIMEOUT = 300  # a follow that saw nothing this long is opened again (from then on)
MAX_FOLLOWS = 512  # worker threads (two per container) and connections of the follower's client


class DockerOutput:
    def __init__(self, owner: str, sink: OutputSink) -> None:
        self.owner = owner
        self.sink = sink
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
        try:
            async with anyio.create_task_group() as tg:
                for stream in STREAMS:
                    tg.start_soon(self._follow, client, cid, of, stream, since)
        finally:
            self.followed.discard(cid)
            self.sink.closed(of)

    async def _follow(self, client: Any, cid: str, of: OutputOf, stream: OutputStream, since: int | None) -> None:
        sink = self.sink

        def pump() -> None:
            start = since
            while True:
                try:
                    chunks = client.api.logs(
                        cid, stdout=stream == "stdout", stderr=stream == "stderr", stream=True, follow=True,
                        since=start,
                    )  # fmt: skip
                    for chunk in chunks:
                        anyio.from_thread.run_sync(sink.write, of, stream, chunk)
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
