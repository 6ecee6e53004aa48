"""The control plane process: NATS request handlers around `core.ControlPlane`, plus its housekeeping loops.

Thin by design: decode a request, call the operation, encode the reply. Every failure becomes an error reply with
a code (never a silent timeout), and the service keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec
import nats
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from aube.controlplane.core import ControlPlane
from aube.controlplane.runtimes.base import Runtime
from aube.shared import names
from aube.shared.credentials import redact
from aube.shared.errors import AubeError, RuntimeFailure
from aube.shared.registry import Registry
from aube.shared.schemas import (
    DeleteRequest,
    ListRequest,
    ScaleRequest,
    StopInstanceRequest,
    UploadRequest,
    decode,
    encode,
    error_reply,
)
from aube.shared.settings import ControlPlaneSettings

log = logging.getLogger(__name__)

# How often retirement runs (delete grace, retired versions, lost stop requests); cheap: two KV snapshots.
RETIRE_INTERVAL = 1.0


async def select_runtime(settings: ControlPlaneSettings) -> Runtime:
    """`auto` prefers Docker and falls back to processes when no engine answers."""
    if settings.runtime in ("auto", "docker"):
        from aube.controlplane.runtimes.docker import DockerRuntime

        try:
            return await DockerRuntime.connect(settings)
        except RuntimeFailure as e:
            if settings.runtime == "docker":
                raise
            log.warning("the Docker runtime is unavailable (%s): instances run as local processes", e)
    from aube.controlplane.runtimes.process import ProcessRuntime

    return ProcessRuntime(settings)


Handler = Callable[[Any], Awaitable[msgspec.Struct]]


async def serve(
    settings: ControlPlaneSettings,
    *,
    runtime: Runtime | None = None,
    task_status: TaskStatus[ControlPlane] = anyio.TASK_STATUS_IGNORED,
) -> None:
    runtime = runtime if runtime is not None else await select_runtime(settings)
    nc = await nats.connect(settings.nats_url, name=f"aube-controlplane-{settings.owner}", max_reconnect_attempts=-1)
    cp: ControlPlane | None = None
    try:
        js = nc.jetstream()
        registry = await Registry.open(js)
        bundles = await js.create_object_store(names.BUCKET_BUNDLES)
        cp = ControlPlane(settings, nc, registry, runtime, bundles)
        await cp.reconcile(startup=True)
        routes: list[tuple[str, type[msgspec.Struct], Handler]] = [
            (names.SUBJECT_UPLOAD, UploadRequest, cp.upload),
            (names.SUBJECT_DELETE, DeleteRequest, cp.delete),
            (names.SUBJECT_LIST, ListRequest, cp.list),
            (names.SUBJECT_SCALE, ScaleRequest, cp.scale),
            (names.SUBJECT_STOP_INSTANCE, StopInstanceRequest, cp.stop_instance),
        ]
        async with anyio.create_task_group() as tg:
            for subject, kind, handler in routes:
                sub = await nc.subscribe(subject, queue=names.QUEUE_CONTROLPLANE)
                tg.start_soon(_pump, sub, kind, handler, tg)
            tg.start_soon(_every, settings.reconcile_interval, cp.reconcile, "reconcile")
            tg.start_soon(_every, RETIRE_INTERVAL, cp.retire_pass, "retirement")
            await nc.flush()
            log.info(
                "control plane %s serving on %s with the %s runtime",
                settings.owner,
                redact(settings.nats_url),
                runtime.kind,
            )
            task_status.started(cp)
    finally:
        with anyio.move_on_after(60, shield=True):
            if settings.stop_instances_on_exit and cp is not None:
                await cp.stop_everything()
        with anyio.move_on_after(5, shield=True):
            await nc.drain()
            await runtime.close()


async def _pump(sub: Subscription, kind: type[msgspec.Struct], handler: Handler, tg: TaskGroup) -> None:
    # Each request runs in its own task: an upload takes seconds to minutes and must not hold up a scale request.
    async for msg in sub.messages:
        tg.start_soon(_answer, msg, kind, handler)


async def _answer(msg: Msg, kind: type[msgspec.Struct], handler: Handler) -> None:
    try:
        reply = encode(await handler(decode(msg.data, kind)))
    except AubeError as e:
        log.info("%s refused: %s (%s)", msg.subject, e.message, e.code)
        reply = error_reply(e)
    except Exception as e:
        log.exception("%s failed", msg.subject)
        reply = error_reply(AubeError(f"internal error: {type(e).__name__}: {e}"))
    if msg.reply:  # published without a reply subject (`nats pub`): the work is done all the same
        await msg.respond(reply)


async def _every(interval: float, job: Callable[[], Awaitable[object]], what: str) -> None:
    while True:
        await anyio.sleep(interval)
        try:
            await job()
        except Exception:
            # A pass that failed (NATS reconnecting, the engine busy) is retried on the next tick.
            log.warning("%s pass failed", what, exc_info=True)
