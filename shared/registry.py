"""The instance registry: typed access to the JetStream KV buckets every service shares.

Buckets (names.py): instances, functions, proxy leases, and the proxies' scale intents. Only the proxies (and the
control plane, which owns the account) may use the scale-intents bucket: the reaper opens the registry without it
and its NATS user has no permission on it (deploy/nats.conf). Proxies before that bucket kept their intents in the
leases bucket, as fake leases under `scale-intent.<function>`; one left behind after an upgrade decodes as the lease
of a proxy that never renews and holds no claims, so the reaper deletes it like any dead lease, and nothing else
needs to know about it.

Every write that can race is a compare-and-set on the entry's revision (`kv.create` for absent keys,
`kv.update(..., last=revision)` otherwise). A lost race is a normal outcome: the methods return None and log
at DEBUG; callers re-read and decide again.

An instance's state changes only through `apply`, the one compare-and-set loop: it builds the new record with a
transition of `instance_lifecycle`, retries a lost race a bounded number of times on a fresh read, and treats a
write that timed out as unknown, never as done or not done (see `apply`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

import msgspec
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from aube.shared import buckets, instance_lifecycle, kvread, names, records
from aube.shared.schemas import FunctionRecord, InstanceRecord, ProxyLease, ScaleIntent, encode

log = logging.getLogger(__name__)

# JetStream's "wrong last sequence": nats-py raises it as KeyWrongLastSequenceError for create/update, but as a
# plain BadRequestError for a delete with `last`. A clustered stream's leader answers with the second code (seen on
# the rig: a control plane's stop failed with "internal error" where it had merely lost a race).
WRONG_LAST_SEQUENCE = (10071, 10164)


def lost_race(e: APIError) -> bool:
    """Whether a compare-and-set write or delete failed because the entry had moved on."""
    return isinstance(e, KeyWrongLastSequenceError) or e.err_code in WRONG_LAST_SEQUENCE


# What a registry call raises when NATS is away or slow (a lost race is not one of them: that is an outcome).
REGISTRY_ERRORS = (NatsError, TimeoutError, OSError)


class InstanceEntry(msgspec.Struct, frozen=True):
    """One instance entry as read: a compare-and-set of it must name `revision`."""

    key: str
    revision: int
    record: InstanceRecord


class Written(msgspec.Struct, frozen=True):
    """`apply` wrote the transition: `entry` is the entry as it now is."""

    entry: InstanceEntry


class NotWritten(msgspec.Struct, frozen=True):
    """`apply` did not write, and its write can never land: the entry (None if gone) and why."""

    entry: InstanceEntry | None
    why: str


class Unknown(msgspec.Struct, frozen=True):
    """The write went out but NATS did not answer, and could not be asked afterwards: it may still land. `record` is
    what it would write; the caller remembers it and settles it once the registry answers (proxy/unsettled.py)."""

    key: str
    record: InstanceRecord
    error: str
    revision: int = 0  # the revision the write named: while the entry stays there, the write may still land


Applied = Written | NotWritten | Unknown


class FunctionEntry(msgspec.Struct, frozen=True):
    key: str
    revision: int
    record: FunctionRecord


class LeaseEntry(msgspec.Struct, frozen=True):
    key: str
    revision: int
    record: ProxyLease


class ScaleIntentEntry(msgspec.Struct, frozen=True):
    key: str
    revision: int
    record: ScaleIntent


class InstanceChange(msgspec.Struct, frozen=True):
    """One event from `watch_instances`: `record` is None when the key was deleted."""

    key: str
    revision: int
    record: InstanceRecord | None


class Registry:
    def __init__(
        self,
        js: JetStreamContext,
        instances: KeyValue,
        functions: KeyValue,
        leases: KeyValue,
        scale_intents: KeyValue | None = None,
    ) -> None:
        self.js = js
        self.instances_kv = instances
        self.functions_kv = functions
        self.leases_kv = leases
        self.scale_intents_kv = scale_intents

    @classmethod
    async def open(
        cls,
        js: JetStreamContext,
        *,
        scale_intents: bool = True,
        replicas: int = 1,
        resize: buckets.Resize = buckets.Resize.NEVER,
    ) -> Registry:
        """Bind the buckets, creating a missing one with `replicas` copies; an existing one's count is changed only
        as `resize` allows (buckets.py: the control plane's `EXACT`; other services use a bucket as it is).

        `scale_intents=False` leaves the scale-intents bucket alone, for a service whose NATS user may not use it
        (the reaper); its scale-intent methods then raise RuntimeError."""

        async def kv(bucket: str, ttl: float | None = None) -> KeyValue:
            return await buckets.open_kv(js, bucket, replicas=replicas, resize=resize, history=1, ttl=ttl)

        return cls(
            js,
            await kv(names.BUCKET_INSTANCES),
            await kv(names.BUCKET_FUNCTIONS),
            await kv(names.BUCKET_LEASES),
            await kv(names.BUCKET_SCALE_INTENTS, ttl=names.SCALE_INTENT_MAX_AGE) if scale_intents else None,
        )

    async def _snapshot(self, bucket: str, key_filter: str = ">") -> list[tuple[str, int, bytes]]:
        return [(e.key, e.revision, e.value) for e in await kvread.snapshot(self.js, bucket, key_filter) if e.value]

    # -- instances ---------------------------------------------------------------------------------------

    async def instances(self, function: str | None = None) -> list[InstanceEntry]:
        """Every trustworthy instance entry (records.read: a malformed one is logged and skipped)."""
        entries = await self._snapshot(names.BUCKET_INSTANCES, names.instance_key_filter(function))
        return [
            InstanceEntry(key, rev, record)
            for key, rev, value in entries
            if (record := records.read(key, value, InstanceRecord)) is not None
        ]

    async def get_instance(self, key: str) -> InstanceEntry | None:
        got = await get_latest(self.instances_kv, key)
        record = None if got is None else records.read(key, got[1], InstanceRecord)
        return None if got is None or record is None else InstanceEntry(key, got[0], record)

    async def create_instance(self, record: InstanceRecord) -> int | None:
        """Take the record's slot if it is free; None if another writer holds it."""
        key = names.instance_key(record.function, record.slot)
        try:
            return await self.instances_kv.create(key, encode(record))
        except KeyWrongLastSequenceError:
            log.debug("slot %s already taken", key)
            return None

    async def update_instance(self, entry_revision: int, record: InstanceRecord) -> int | None:
        """Replace the record if it is still at `entry_revision`; None on a lost race. A raw write, for tests and
        repairs: services change an instance's state only through `apply` and a transition of `instance_lifecycle`."""
        key = names.instance_key(record.function, record.slot)
        try:
            return await self.instances_kv.update(key, encode(record), last=entry_revision)
        except KeyWrongLastSequenceError:
            log.debug("lost race updating %s at revision %d", key, entry_revision)
            return None

    async def apply(
        self,
        key: str,
        change: Callable[[InstanceRecord], InstanceRecord],
        *,
        entry: InstanceEntry | None = None,
        attempts: int = 5,
        learn_outcome: bool = True,
    ) -> Applied:
        """Apply a lifecycle transition to the entry at `key` by compare-and-set.

        `change` builds the new record from the current one (a function of `instance_lifecycle`); when it raises
        `instance_lifecycle.Refused`, nothing is written. Starts from `entry` when given (the revision a decision was
        made on), else from a fresh read. A lost race re-reads and tries again, `attempts` writes in all: one for a
        claim, which had rather try another instance than wait for this one.

        A write that times out (NATS away, a leader change) may have landed or may still land (nats-py resends what
        it buffered on reconnect). So it is never guessed: the entry is read again; if it shows the record written,
        the write won; if it is still at the revision the write named, the same record is written back at that
        revision, which moves the revision on so the lost write can never land; if it changed otherwise, the write
        lost. Only when the registry cannot be read either is the outcome `Unknown`. A read that fails before any
        write raises (nothing was written).

        `learn_outcome=False`: a write that times out is `Unknown` at once, for a caller that settles it later off
        its own critical path (the proxy's claims: during a leader change, write, read and fence would each wait
        out their timeout while a client waits).
        """
        current = entry if entry is not None else await self.get_instance(key)
        tries = 0
        while current is not None:
            try:
                new = change(current.record)
            except instance_lifecycle.Refused as e:
                return NotWritten(current, e.why)
            tries += 1
            try:
                revision = await self.instances_kv.update(key, encode(new), last=current.revision)
            except KeyWrongLastSequenceError:
                log.debug("lost race writing %s at revision %d", key, current.revision)
                if tries >= attempts:
                    return NotWritten(current, f"changed by another writer ({tries} tries)")
                current = await self.get_instance(key)
                continue
            except REGISTRY_ERRORS as e:
                if not learn_outcome:
                    return Unknown(key, new, str(e) or type(e).__name__, current.revision)
                return await self._outcome_of(current, new, e)
            return Written(InstanceEntry(key, revision, new))
        return NotWritten(None, "the entry is gone")

    async def _outcome_of(self, before: InstanceEntry, new: InstanceRecord, error: Exception) -> Applied:
        """Learn what became of a write that timed out (see `apply`); Unknown if the registry stays silent."""
        try:
            now = await self.get_instance(before.key)
            if now is not None and now.revision > before.revision and now.record == new:
                return Written(now)
            if now is None or now.revision != before.revision:
                return NotWritten(now, "changed while the write's outcome was unknown")
            # Fence: rewrite the same record at the revision the lost write named, so it can never land.
            await self.instances_kv.update(before.key, encode(before.record), last=before.revision)
            return NotWritten(before, "the write did not land (fenced)")
        except KeyWrongLastSequenceError:
            # The revision moved between the read and the fence: the delayed write itself, or someone else's.
            return await self._outcome_of_changed(before, new, error)
        except REGISTRY_ERRORS as e:
            log.debug("outcome of a write to %s unknown: %s, then %s", before.key, error, e)
            return Unknown(before.key, new, str(error) or type(error).__name__, before.revision)

    async def _outcome_of_changed(self, before: InstanceEntry, new: InstanceRecord, error: Exception) -> Applied:
        try:
            now = await self.get_instance(before.key)
        except REGISTRY_ERRORS:
            return Unknown(before.key, new, str(error) or type(error).__name__, before.revision)
        if now is not None and now.record == new:
            return Written(now)
        if now is not None and now.revision == before.revision:
            # Refused, yet unchanged: JetStream holds a write for the entry that it has not committed, most likely
            # ours. Seen on a cluster that lost its quorum: the leader checks a compare-and-set against every write
            # it accepted, a read shows only committed ones, and the pending write lands once the quorum is back.
            return Unknown(before.key, new, str(error) or type(error).__name__, before.revision)
        return NotWritten(now, "changed while the write's outcome was unknown")

    async def fence(self, entry: InstanceEntry) -> bool:
        """Write the entry back unchanged at its revision, so that a write which named that revision and is still in
        flight can never land. False if the entry had moved on already (nothing named its old revision can land)."""
        try:
            await self.instances_kv.update(entry.key, encode(entry.record), last=entry.revision)
        except KeyWrongLastSequenceError:
            return False
        return True

    async def delete_instance(self, key: str, revision: int | None = None) -> bool:
        """Delete (at `revision` if given); False if the entry changed meanwhile."""
        return await delete_at(self.instances_kv, key, revision)

    async def watch_instances(self) -> AsyncIterator[InstanceChange | None]:
        """Current entries, then None (caught up), then every change, for as long as the caller iterates."""
        async for entry in kvread.follow(self.js, names.BUCKET_INSTANCES):
            if entry is None:
                yield None
            elif entry.value is None:
                yield InstanceChange(entry.key, entry.revision, None)
            else:
                # A newer or broken writer must not end the follower's watch: records.read logs and skips.
                record = records.read(entry.key, entry.value, InstanceRecord)
                if record is not None:
                    yield InstanceChange(entry.key, entry.revision, record)

    async def watch_functions(self) -> AsyncIterator[kvread.KvEntry | None]:
        """Like `watch_instances`, with the raw value: the caller decides what an unreadable record means."""
        async for entry in kvread.follow(self.js, names.BUCKET_FUNCTIONS):
            yield entry

    # -- functions ---------------------------------------------------------------------------------------

    async def functions(self) -> list[FunctionEntry]:
        return [
            FunctionEntry(key, rev, record)
            for key, rev, value in await self._snapshot(names.BUCKET_FUNCTIONS)
            if (record := records.read(key, value, FunctionRecord)) is not None
        ]

    async def get_function(self, name: str) -> FunctionEntry | None:
        got = await get_latest(self.functions_kv, name)
        record = None if got is None else records.read(name, got[1], FunctionRecord)
        return None if got is None or record is None else FunctionEntry(name, got[0], record)

    async def put_function(self, record: FunctionRecord, revision: int | None) -> int | None:
        """Create (revision None) or replace at `revision`; None on a lost race."""
        try:
            if revision is None:
                return await self.functions_kv.create(record.name, encode(record))
            return await self.functions_kv.update(record.name, encode(record), last=revision)
        except KeyWrongLastSequenceError:
            log.debug("lost race writing function %s", record.name)
            return None

    async def delete_function(self, name: str) -> None:
        await self.functions_kv.delete(name)

    # -- proxy leases ------------------------------------------------------------------------------------

    async def leases(self) -> list[LeaseEntry]:
        return [
            LeaseEntry(key, rev, record)
            for key, rev, value in await self._snapshot(names.BUCKET_LEASES)
            if (record := records.read(key, value, ProxyLease)) is not None
        ]

    async def put_lease(self, lease: ProxyLease) -> int:
        return await self.leases_kv.put(lease.proxy_id, encode(lease))

    async def delete_lease(self, proxy_id: str, revision: int | None = None) -> bool:
        return await delete_at(self.leases_kv, proxy_id, revision)

    # -- scale intents -----------------------------------------------------------------------------------

    def _intents(self) -> KeyValue:
        if self.scale_intents_kv is None:
            raise RuntimeError("registry opened without the scale-intents bucket")
        return self.scale_intents_kv

    async def get_scale_intent(self, function: str) -> ScaleIntentEntry | None:
        got = await get_latest(self._intents(), function)
        record = None if got is None else records.read(function, got[1], ScaleIntent)
        return None if got is None or record is None else ScaleIntentEntry(function, got[0], record)

    async def take_scale_intent(self, intent: ScaleIntent) -> bool:
        """True if `intent` now holds its function's window: written where there was none, or over one no longer in
        force at `intent.asked_at` (or untrustworthy) by compare-and-set on the revision read. False if another
        replica's intent is in force, or another replica won the takeover: exactly one writer wins each window."""
        kv = self._intents()
        key = intent.function
        value = encode(intent)
        # Twice at most: an intent can vanish (max_age) between the refused create and the read.
        for _ in range(2):
            try:
                await kv.create(key, value)
                return True
            except KeyWrongLastSequenceError:
                pass
            got = await get_latest(kv, key)
            if got is None:
                continue
            revision, held_value = got
            held = records.read(key, held_value, ScaleIntent)  # an unreadable one is taken over like an expired one
            if held is not None and held.in_force(intent.asked_at):
                log.debug("scale intent for %s held by %s until %.3f", key, held.proxy_id, held.expires_at)
                return False
            try:
                await kv.update(key, value, last=revision)
                return True
            except KeyWrongLastSequenceError:
                log.debug("lost race taking over the scale intent for %s at revision %d", key, revision)
                return False
        return False


async def delete_at(kv: KeyValue, key: str, revision: int | None) -> bool:
    """Delete `key` (at `revision` if given, by compare-and-set); False if it changed meanwhile."""
    try:
        await kv.delete(key, last=revision)
    except APIError as e:
        if not lost_race(e):
            raise
        log.debug("lost race deleting %s at revision %s", key, revision)
        return False
    return True


async def get_latest(kv: KeyValue, key: str) -> tuple[int, bytes] | None:
    """A key's (revision, value) by one message get; None when it is missing or deleted."""
    try:
        entry = await kv.get(key)
    except (KeyNotFoundError, NotFoundError):  # KeyDeletedError is a KeyNotFoundError
        return None
    if entry.value is None:
        return None
    return entry.revision or 0, entry.value
