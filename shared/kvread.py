"""Reading a JetStream KV bucket whole: a consistent snapshot, or a follow that knows when it has caught up.

Why not nats-py's `kv.watch()` and its initial `None` marker:
- The marker can come before entries that existed when the watch started (nats-io/nats.py#842): the client
  compares the server's pending count with the messages it has parsed so far, and messages already sent but
  still in flight count as neither. A snapshot missing entries is dangerous here: a function missing from it
  looks deleted (retirement stops its instances) and a lease missing from it looks expired (the reaper takes
  over live streams). CI saw a warm instance stopped this way.
- Every watch leaves an ephemeral consumer on the server for its 5-minute inactivity threshold, even after
  `stop()`. Snapshots taken every second pile up hundreds of consumers per bucket until the server refuses new
  ones ("maximum consumers limit reached").

So a snapshot reads through a pull consumer: nothing is delivered before we ask, each message says how many
remain, and the consumer is deleted when the snapshot is done. In a cluster, two more things are true (measured on
3 local nodes, an R3 bucket, 300 snapshots each right after a write through another node): the new consumer can live
on another server whose interest has not reached ours yet, so the first fetch gets "no responders" (17 of 300); and
on a replica that has not applied the latest writes yet, so the snapshot misses one just acknowledged (1 of 300). So
the first fetch is tried again briefly, and the stream's leader names the newest message under the filter before
the consumer is made: a snapshot that has not reached it is taken again. A follow keeps an ordered consumer, as
`kv.watch()` does, for its change feed (one long-lived consumer), but decides "caught up" itself: the feed delivers
in stream order, so once it has seen a message at or past the stream's last sequence as of before it began, every
entry that existed then has been delivered (or superseded by a later one it has seen).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
import msgspec
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError, ServiceUnavailableError
from nats.js.kv import KV_DEL, KV_MARKER_REASON, KV_OP, KV_PURGE

# The server drops a snapshot consumer on its own after this long, should we die before deleting it.
SNAPSHOT_CONSUMER_TTL = 30.0
SNAPSHOT_ATTEMPTS = 5  # consumers on a replica behind the newest message, then it is an error
FIRST_FETCH_ATTEMPTS = 20  # 50 ms apart: the new consumer's interest on its way to our server
SNAPSHOT_BATCH = 256
FETCH_TIMEOUT = 5.0
# A follow's consumer sends a heartbeat this often when idle; two missed and nats-py recreates it (see `follow`).
FOLLOW_HEARTBEAT = 0.5


class KvEntry(msgspec.Struct, frozen=True):
    """One key's latest state. `value` is None when the key was deleted or purged."""

    key: str
    revision: int
    value: bytes | None


def stream_name(bucket: str) -> str:
    return f"KV_{bucket}"


def _entry(bucket: str, subject: str, revision: int, headers: dict[str, str] | None, data: bytes) -> KvEntry:
    headers = headers or {}
    # Server-placed markers (TTL expiry, nats-server 2.11+) carry a reason instead of an operation.
    deleted = headers.get(KV_OP) in (KV_DEL, KV_PURGE) or KV_MARKER_REASON in headers
    key = subject[len(f"$KV.{bucket}.") :]
    return KvEntry(key, revision, None if deleted or not data else data)


async def snapshot(js: JetStreamContext, bucket: str, key_filter: str = ">") -> list[KvEntry]:
    """The latest state of every key under `key_filter`, deletions included (value None), in stream order.

    Complete: every write acknowledged before the call is in it (later ones may be too). Raises TimeoutError when the
    consumers stay behind the newest message (a replica far behind its leader). Each key once: the consumer goes on
    past its start with messages written meanwhile, so a key changed after it was read comes again; the later message
    is its state (seen as one instance listed twice, starting and free)."""
    stream = stream_name(bucket)
    subject = f"$KV.{bucket}.{key_filter}"
    try:
        newest = (await js.get_msg(stream, subject=subject)).seq or 0  # the leader's answer, wildcards and all
    except NotFoundError:
        newest = 0
    for attempt in range(SNAPSHOT_ATTEMPTS):
        entries = await _read_through_consumer(js, stream, bucket, subject)
        if not newest or any(entry.revision >= newest for entry in entries):
            return entries
        await anyio.sleep(0.05 * (attempt + 1))
    raise TimeoutError(f"snapshots of {bucket} stayed behind its message {newest}")


async def _read_through_consumer(js: JetStreamContext, stream: str, bucket: str, subject: str) -> list[KvEntry]:
    info = await js.add_consumer(
        stream,
        ConsumerConfig(
            filter_subject=subject,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=AckPolicy.NONE,
            mem_storage=True,
            inactive_threshold=SNAPSHOT_CONSUMER_TTL,
        ),
    )
    assert info.name is not None  # the server names every consumer it creates
    latest: dict[str, KvEntry] = {}
    try:
        pending = info.num_pending or 0
        if pending:
            sub = await js.pull_subscribe_bind(consumer=info.name, stream=stream)
            try:
                fetched = 0
                while pending > 0:
                    try:
                        batch = await sub.fetch(min(pending, SNAPSHOT_BATCH), timeout=FETCH_TIMEOUT)
                    except ServiceUnavailableError:  # "no responders": the consumer is not known here yet
                        fetched += 1
                        if latest or fetched >= FIRST_FETCH_ATTEMPTS:
                            raise
                        await anyio.sleep(0.05)
                        continue
                    for msg in batch:
                        meta = msg.metadata
                        entry = _entry(bucket, msg.subject, meta.sequence.stream, msg.headers, msg.data)
                        latest.pop(entry.key, None)  # keeps the order of stream positions
                        latest[entry.key] = entry
                        pending = meta.num_pending
            finally:
                await sub.unsubscribe()
    finally:
        with anyio.move_on_after(FETCH_TIMEOUT, shield=True), contextlib.suppress(Exception):
            await js.delete_consumer(stream, info.name)
    return list(latest.values())


async def follow(js: JetStreamContext, bucket: str) -> AsyncIterator[KvEntry | None]:
    """Every key's current state, then None once caught up, then every change, for as long as the caller
    iterates. A change may repeat one already delivered (same revision); revisions only grow.

    The feed is an ordered push consumer, as `kv.watch()` makes, but with a 0.5 s idle heartbeat instead of its 5 s:
    nats-py recreates an ordered consumer once two heartbeats are missed, and tries again as often while that fails.
    A consumer lives on one server; when that server is lost (a partitioned or killed JetStream leader) the
    follower learns nothing until the consumer is recreated elsewhere. With 5 s heartbeats and a failed first
    recreate (no leader yet) a proxy's view stayed stale for 20 s after the rig's faults, and it answered 404 for a
    function just deployed."""
    stream = stream_name(bucket)
    state = (await js.stream_info(stream)).state
    # A KV bucket keeps each key's last message, so the message at `last_seq` is there to be seen, unless the
    # whole stream was purged.
    last = state.last_seq if state.messages else 0
    sub = await js.subscribe(
        f"$KV.{bucket}.>",
        stream=stream,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        idle_heartbeat=FOLLOW_HEARTBEAT,
        inactive_threshold=SNAPSHOT_CONSUMER_TTL,
    )
    try:
        caught_up = last == 0
        if caught_up:
            yield None
        async for msg in sub.messages:
            entry = _entry(bucket, msg.subject, msg.metadata.sequence.stream, msg.headers, msg.data)
            yield entry
            if not caught_up and entry.revision >= last:
                caught_up = True
                yield None
    finally:
        # Also runs when the generator is finalized late, after the connection closed: nothing left to stop then.
        with anyio.move_on_after(FETCH_TIMEOUT, shield=True), contextlib.suppress(Exception):
            await sub.unsubscribe()
