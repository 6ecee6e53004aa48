"""Opening JetStream buckets (the registry's KV buckets, the bundle object stores) at a replica count.

A bucket is a stream (`KV_<bucket>`, `OBJ_<bucket>`), and its replica count is that stream's `num_replicas`, which
JetStream lets an update change in place: the entries stay, new replicas catch up from the leader. So a bucket is
bound as it exists, created when missing, and its count changed by a stream update of the configuration the server
holds with only `num_replicas` changed (history, the scale-intents bucket's max_age and every other setting kept).

Who changes a count (`Resize`, decided by `new_replicas`, pure):
- `EXACT`: the control plane. Its setting is the platform's; its NATS user is the only platform user that may
  update streams (deploy/nats.conf).
- `RAISE`: the CLI, for the bundle store in a tenant's own account. A tenant's deployers are many and unsynchronised:
  one whose setting is unset (1) must not undo another's 3, so it only ever raises.
- `NEVER`: proxies and reapers. Their NATS users may create the buckets but not update them; a count other than
  theirs is noted (INFO) and the bucket used as it is: the control plane settles it.

Buckets are looked up before they are created: a create whose configuration differs from the bucket's in any way
(another replica count, an older client's defaults) is refused by the server ("stream name already in use with a
different configuration"), where binding just works. Two services creating the same bucket at once: one wins, the
other's refused create is answered by binding to the winner's bucket.

A bucket just created or resized in a cluster may not take writes at once. After a creation, its leader's interest in
the bucket's subjects reaches the other servers a moment later, and a write through one of them meanwhile gets "no
responders" (seen here: a bundle put right after the store was created). After a replica change, a write in the
first half second or so got no answer at all: it waited out its whole timeout (5 s) and failed. So the control plane
and the CLI wait, briefly, until a probe write reaches the bucket and is answered (`_until_reachable`). Proxies and
reapers do not: their users may not write every bucket (a probe would be a permissions violation), and their writes
are retried anyway, as during any NATS hiccup.

A count that cannot be applied now (a cluster node down: JetStream places every replica at once) is logged as a
WARNING and the bucket used as it is; the control plane tries again on its next start.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Awaitable, Callable

import anyio
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import StreamInfo
from nats.js.errors import APIError, BadRequestError, NoStreamResponseError, NotFoundError, ServiceUnavailableError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

log = logging.getLogger(__name__)

# JetStream's "stream name already in use with a different configuration".
STREAM_NAME_IN_USE = 10058
# A probe is a write that names a stream no bucket has (`Nats-Expected-Stream`): the bucket refuses it, storing
# nothing, and its refusal shows that it is reachable.
PROBE_EXPECTED_STREAM = "aube-probe-no-such-stream"
REACHABLE_TIMEOUT = 10.0
PROBE_TIMEOUT = 0.5
# JetStream's "no suitable peers for placement": seen for a moment while a cluster settles after its start.
NO_SUITABLE_PEERS = 10005
SETTLE_TIMEOUT = 15.0


class Resize(enum.Enum):
    EXACT = "exact"
    RAISE = "raise"
    NEVER = "never"


def new_replicas(current: int, wanted: int, resize: Resize) -> int | None:
    """The replica count to update a bucket to, or None to leave it as it is."""
    if current == wanted or resize is Resize.NEVER:
        return None
    if resize is Resize.RAISE and wanted < current:
        return None
    return wanted


def kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def object_stream(bucket: str) -> str:
    return f"OBJ_{bucket}"


async def open_kv(
    js: JetStreamContext,
    bucket: str,
    *,
    replicas: int,
    resize: Resize,
    history: int = 1,
    ttl: float | None = None,
) -> KeyValue:
    """The KV bucket, created with `history`, `ttl` and `replicas` when missing; an existing one's replica count
    updated as `resize` allows, its other settings left as they are."""

    async def create() -> None:
        await js.create_key_value(bucket=bucket, history=history, ttl=ttl, replicas=replicas)

    await _open(js, kv_stream(bucket), create, _kv_probe(bucket), replicas, resize)
    return await js.key_value(bucket)


async def open_object_store(js: JetStreamContext, bucket: str, *, replicas: int, resize: Resize) -> ObjectStore:
    """The object store, as `open_kv` opens a KV bucket."""

    async def create() -> None:
        await js.create_object_store(bucket, replicas=replicas)

    await _open(js, object_stream(bucket), create, _object_probe(bucket), replicas, resize)
    return await js.object_store(bucket)


async def _open(
    js: JetStreamContext,
    stream: str,
    create: Callable[[], Awaitable[None]],
    probe: str,
    replicas: int,
    resize: Resize,
) -> None:
    """Resize the bucket if it exists, else create it. A creation refused while the cluster settles (a peer briefly
    offline in the meta leader's view: "no suitable peers for placement"; no meta leader yet) is tried again for
    SETTLE_TIMEOUT; a creation refused because the bucket appeared meanwhile binds to it."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        info = await _stream_info(js, stream)
        if info is not None:
            await _resize(js, info, replicas, resize, probe)
            return
        try:
            await create()
        except BadRequestError as e:
            if e.err_code == STREAM_NAME_IN_USE and time.monotonic() <= deadline:
                continue  # created meanwhile by another service: bind to it as it is
            if e.err_code != NO_SUITABLE_PEERS or time.monotonic() > deadline:
                raise
            log.info("%s: creation refused for now (%s); trying again", stream, e.description)
        except (ServiceUnavailableError, TimeoutError) as e:
            if time.monotonic() > deadline:
                raise
            log.info("%s: creation refused for now (%s); trying again", stream, e)
        else:
            if resize is not Resize.NEVER:
                await _until_reachable(js, probe)
            return
        await anyio.sleep(0.5)


def _kv_probe(bucket: str) -> str:
    return f"$KV.{bucket}.aube-probe"


def _object_probe(bucket: str) -> str:
    return f"$O.{bucket}.M.aube-probe"


async def _until_reachable(js: JetStreamContext, subject: str) -> None:
    """Until a probe written to `subject` is answered by its bucket, for at most REACHABLE_TIMEOUT (then the writes
    that follow meet the trouble, as they would have without the wait)."""
    deadline = time.monotonic() + REACHABLE_TIMEOUT
    while True:
        try:
            await js.publish(subject, b"", stream=PROBE_EXPECTED_STREAM, timeout=PROBE_TIMEOUT)
            return  # stored: cannot happen (no stream has that name), but reachable all the same
        except APIError:
            return  # the expected refusal: the bucket is there and answers
        except (NoStreamResponseError, TimeoutError):
            if time.monotonic() > deadline:
                log.warning("%s: the bucket does not answer %.0f s after its change", subject, REACHABLE_TIMEOUT)
                return
            await anyio.sleep(0.05)


async def _stream_info(js: JetStreamContext, stream: str) -> StreamInfo | None:
    try:
        return await js.stream_info(stream)
    except NotFoundError:
        return None


async def _resize(js: JetStreamContext, info: StreamInfo, wanted: int, resize: Resize, probe: str) -> None:
    config = info.config
    current = config.num_replicas or 1
    target = new_replicas(current, wanted, resize)
    if target is None:
        if current != wanted:
            log.info(
                "%s has %d replicas (this service would create it with %d); used as it is", config.name, current, wanted
            )
        return
    try:
        # The configuration as the server holds it, with only the count changed: nats-py's StreamConfig carries
        # every field nats-server 2.15 reports for these streams (tests/faults/test_replicated_state.py compares the
        # server's whole configuration before and after).
        await js.update_stream(config.evolve(num_replicas=target))
    except (NatsError, TimeoutError) as e:
        log.warning("%s: cannot change its %d replicas to %d now (%s); used as it is", config.name, current, target, e)
        return
    log.info("%s: replicas changed from %d to %d", config.name, current, target)
    await _until_reachable(js, probe)
