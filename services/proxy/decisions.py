"""Pure claim and scale decisions: which instances a proxy may try, in which order, and when to scale.

No I/O here: the service feeds in its local view of the registry (kept by a KV watch), and writes each claim by
compare-and-set (`Registry.apply` with `instance_lifecycle.claim`). Exclusivity does not rest on this module: a
stale view only costs a lost compare-and-set, after which the next candidate is tried.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import msgspec

from aube.shared import names
from aube.shared.instance_lifecycle import claimable, warm
from aube.shared.registry import InstanceEntry
from aube.shared.schemas import FunctionRecord, InstanceRecord, ScaleIntent


def candidates(
    fn: FunctionRecord, entries: Iterable[InstanceEntry], *, salt: str, skip: frozenset[str] = frozenset()
) -> list[InstanceEntry]:
    """Claimable entries in the order to try them.

    The order is a hash of (salt, key): with a fresh salt per claim, concurrent claimers (in this replica and in
    others) start on different instances instead of all racing for the first one.
    """
    found = [e for e in entries if e.key not in skip and claimable(fn, e.record)]
    found.sort(key=lambda e: hashlib.blake2s(f"{salt}/{e.key}".encode(), digest_size=8).digest())
    return found


class PoolCounts(msgspec.Struct, frozen=True, kw_only=True):
    free: int = 0  # claimable now
    starting: int = 0  # current version, will become free
    total: int = 0  # every slot of the function, in any state (slots count against max_instances)


def counts(fn: FunctionRecord, entries: Iterable[InstanceEntry]) -> PoolCounts:
    free = starting = total = 0
    for e in entries:
        rec = e.record
        if rec.function != fn.name:
            continue
        total += 1
        if claimable(fn, rec):
            free += 1
        elif warm(fn, rec):  # not free, so starting: it will become free
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


def ping_bound(fn: FunctionRecord | None, rec: InstanceRecord) -> float | None:
    """How long a live peer of a stream on `rec` may stay silent: `ping_interval + ping_timeout`. None when the
    instance does not ping (no `[limits] ping_interval`, or started under another version than `fn`'s, whose
    policy it may not have: an older version's instance may be silent by right).

    A pinging instance sends a frame at least every `ping_interval`, and a live client answers each ping within
    `ping_timeout`; so either side silent past the bound is hung. The relay judges the instance by it
    (streams.py), a handed-off stream's instance judges its client by it, and the proxy the instance's
    heartbeat (handoff.py)."""
    if fn is None or fn.version != rec.version:
        return None
    limits = fn.manifest.limits
    if limits.ping_interval <= 0:
        return None
    return limits.ping_interval + limits.ping_timeout
