"""Pure claim, scale and reservation decisions: which instances a proxy may try, in which order, when to scale,
and how many free instances to hold reserved ahead of demand (and when to give one back).

No I/O here: the service feeds in its local view of the registry (kept by a KV watch), and writes each claim by
compare-and-set (`Registry.apply` with `instance_lifecycle.claim`). Exclusivity does not rest on this module: a
stale view only costs a lost compare-and-set, after which the next candidate is tried.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Literal

import msgspec

from aube.shared import names
from aube.shared.instance_lifecycle import claimable, holds, warm
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


def stream_limits(fn: FunctionRecord | None) -> tuple[float | None, float | None]:
    """The stream's idle timeout and longest duration from `[limits]` (None: not limited), as the relay enforces
    them and as a handed-off stream's instance is told them."""
    if fn is None:
        return None, None
    limits = fn.manifest.limits
    idle = limits.stream_idle_timeout if limits.stream_idle_timeout > 0 else None
    longest = limits.stream_max_duration if limits.stream_max_duration > 0 else None
    return idle, longest


def broken_limit(
    elapsed: float, quiet: float | None, limits: tuple[float | None, float | None], grace: float
) -> str | None:
    """Which limit a handed-off stream broke, judged by the proxy (a backstop: the instance closes the stream at the
    limit itself, but it runs the function's code, which can stop it). `elapsed`: since the handoff; `quiet`: seconds
    since the client's connection last carried data either way, as its kernel counts (None: unknown). `grace` lets
    an honest instance close the stream first."""
    idle, longest = limits
    if longest is not None and elapsed >= longest + grace:
        return "max_duration"
    if idle is not None and quiet is not None and quiet >= idle + grace:
        return "idle_timeout"
    return None


# -- reservations (proxy/reserve.py) ----------------------------------------------------------------------------

Fate = Literal["keep", "give_back", "forget"]


def reservation_target(fn: FunctionRecord | None, pool: PoolCounts, setting: int) -> int:
    """How many instances of `fn` this replica holds reserved now: `setting` (AUBE_RESERVE), or 0.

    0 for a function with `min_free = 0`: it has no warm pool that the control plane's keeper tops back up, so every
    free instance is one a scale-out started for a waiting client (of this replica or another) or one left after a
    stream, to be reaped; reserving it would take it from that client. 0 too while the function is at
    `max_instances` (`pool.total`, slots in any state): it cannot grow, so a free instance held here could be the
    one another replica's client waits for. Below the cap the keeper counts a reservation as busy and tops the warm
    pool back up to `min_free`, so the total stays bounded (min_free + replicas x setting, within max_instances).
    """
    if fn is None or fn.deleting or fn.manifest.scaling.min_free <= 0:
        return 0
    if pool.total >= fn.manifest.scaling.max_instances:
        return 0
    return max(0, setting)


def reservations_to_take(fn: FunctionRecord, pool: PoolCounts, *, held: int, setting: int) -> int:
    """How many free instances of `fn` this replica claims now as reservations, ahead of demand: up to
    `reservation_target`, counting what it already holds (reserved, or kept after a stream)."""
    return max(0, min(reservation_target(fn, pool, setting) - held, pool.free))


def reservation_fate(fn: FunctionRecord | None, held: InstanceEntry, current: InstanceEntry | None) -> Fate:
    """What to do with an instance this replica holds reserved (`held`: its claim as written), seeing `current` (its
    entry in the view) and `fn` (the function as the view shows it; None when deleted or being deleted).

    - "forget": the entry is gone, names another instance, was moved on by someone else (draining, unhealthy) or
      shows a claim that is not this one at a newer revision: nothing of ours is left to release;
    - "give_back": release it (`instance_lifecycle.release`, which drains what must not serve again), because the
      function was deleted, a new version is live or the instance was marked to retire (so retirement can stop the
      old version at once);
    - "keep": it may serve this replica's next client.

    The view may lag behind this replica's own claim (still showing the entry free at an older revision): only a
    newer revision without our claim counts as changed under us.
    """
    claim = held.record
    if current is None or current.record.instance_id != claim.instance_id:
        return "forget"
    rec = current.record
    if rec.state in ("draining", "unhealthy"):
        return "forget"
    if current.revision > held.revision and not holds(rec, claim):
        return "forget"
    if fn is None or fn.deleting or claim.version != fn.version or rec.retire or claim.function != fn.name:
        return "give_back"
    return "keep"
