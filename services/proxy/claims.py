"""Pure claim and scale decisions: which instances a proxy may try, what a claim and a release write, when to scale.

No I/O here: the service feeds in its local view of the registry (kept by a KV watch) and `now`, and performs
the compare-and-set writes these functions describe. Exclusivity does not rest on this module: a stale view
only costs a lost compare-and-set, after which the next candidate is tried.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Literal

import msgspec

from aube.shared import names
from aube.shared.schemas import FunctionRecord, InstanceRecord, ScaleIntent


class Slot(msgspec.Struct, frozen=True):
    """One registry entry as the proxy last saw it: the revision is what a compare-and-set must match."""

    key: str
    revision: int
    record: InstanceRecord


def claimable(fn: FunctionRecord, rec: InstanceRecord) -> bool:
    return (
        not fn.deleting
        and rec.function == fn.name
        and rec.state == "free"
        and rec.version == fn.version
        and not rec.retire
        and bool(rec.address)
    )


def candidates(
    fn: FunctionRecord, slots: Iterable[Slot], *, salt: str, skip: frozenset[str] = frozenset()
) -> list[Slot]:
    """Claimable slots in the order to try them.

    The order is a hash of (salt, key): with a fresh salt per claim, concurrent claimers (in this replica and in
    others) start on different instances instead of all racing for the first one.
    """
    found = [s for s in slots if s.key not in skip and claimable(fn, s.record)]
    found.sort(key=lambda s: hashlib.blake2s(f"{salt}/{s.key}".encode(), digest_size=8).digest())
    return found


def claimed(rec: InstanceRecord, proxy_id: str, now: float) -> InstanceRecord:
    return msgspec.structs.replace(rec, state="busy", claimed_by=proxy_id, claimed_at=now)


def unhealthy(rec: InstanceRecord) -> InstanceRecord:
    return msgspec.structs.replace(rec, state="unhealthy", claimed_by=None, claimed_at=None)


ReleaseKind = Literal["free", "draining"]


def release(
    rec: InstanceRecord, fn: FunctionRecord | None, now: float, *, used: bool = True
) -> tuple[ReleaseKind, InstanceRecord]:
    """What a busy instance becomes when its stream ends.

    It goes back to "free" unless it must not serve again: its function is gone or being deleted, a newer
    version is current, it was told to retire, or the function wants a fresh instance per stream (only when
    the stream actually reached it: `used`). A "draining" instance is then stopped by the control plane.
    """
    stale = fn is None or fn.deleting or fn.version != rec.version or rec.retire
    fresh = fn is not None and fn.manifest.scaling.fresh_per_stream and used
    if stale or fresh:
        return "draining", msgspec.structs.replace(rec, state="draining", claimed_by=None, claimed_at=None)
    return "free", msgspec.structs.replace(
        rec,
        state="free",
        claimed_by=None,
        claimed_at=None,
        last_used=now,
        streams_served=rec.streams_served + (1 if used else 0),
    )


class PoolCounts(msgspec.Struct, frozen=True, kw_only=True):
    free: int = 0  # claimable now
    starting: int = 0  # current version, will become free
    total: int = 0  # every slot of the function, in any state (slots count against max_instances)


def counts(fn: FunctionRecord, slots: Iterable[Slot]) -> PoolCounts:
    free = starting = total = 0
    for s in slots:
        rec = s.record
        if rec.function != fn.name:
            continue
        total += 1
        if claimable(fn, rec):
            free += 1
        elif rec.state == "starting" and rec.version == fn.version and not rec.retire:
            starting += 1
    return PoolCounts(free=free, starting=starting, total=total)


def scale_count(fn: FunctionRecord, pool: PoolCounts, waiting: int) -> int:
    """How many instances to ask for: enough for min_free warm ones plus one per waiting client.

    Instances already starting count as coming, so a slow cold start does not trigger more requests. The
    ask never exceeds the free slots the view knows of; the control plane enforces the real cap anyway.
    """
    if fn.deleting:
        return 0
    scaling = fn.manifest.scaling
    want = scaling.min_free + waiting - pool.free - pool.starting
    room = scaling.max_instances - pool.total
    return max(0, min(want, room))


def scale_intent(function: str, proxy_id: str, now: float, cooldown: float) -> ScaleIntent:
    """The intent a replica writes before asking to scale `function`: no other replica asks for `cooldown` seconds.

    The window is kept within what the scale-intents bucket holds (names.SCALE_INTENT_MAX_AGE), so every reader
    trusts it (records.py); a cooldown of 0 or less holds no window at all.
    """
    window = min(max(cooldown, 0.0), names.SCALE_INTENT_MAX_AGE)
    return ScaleIntent(function=function, proxy_id=proxy_id, asked_at=now, expires_at=now + window)
