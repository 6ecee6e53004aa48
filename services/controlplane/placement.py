"""Which host a new instance goes to (pure; `runtimes/hosts.py` performs it).

Spread first: the host with the fewest instances of the function, so one host's loss takes as little of each
function's pool as possible; then the least loaded host; then the host id, so equal hosts are chosen the same way.
A host is a candidate while its lease is live (renewed within its ttl), it runs the wanted runtime kind, and it has
room under its `capacity`. `max_instances` is not this module's: the control plane's slots bound it before a host
is ever chosen.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Sequence

from aube.shared.schemas import HostLease, RuntimeKind


def live(lease: HostLease, now: float) -> bool:
    return lease.renewed_at + lease.ttl >= now


def choose_host(
    hosts: Sequence[HostLease],
    placed: Iterable[tuple[str, str]],
    *,
    function: str,
    runtime: RuntimeKind,
    now: float,
    exclude: Collection[str] = (),
) -> str | None:
    """The host for one more instance of `function`; None when no live host has room.

    `placed` is every instance known to run or be starting, as (host id, function) pairs: the registry's entries
    plus the starts in flight, which the registry does not show on a host yet."""
    load: Counter[str] = Counter()
    mine: Counter[str] = Counter()
    for host_id, fn in placed:
        load[host_id] += 1
        if fn == function:
            mine[host_id] += 1
    candidates = [
        h
        for h in hosts
        if h.host_id not in exclude and h.runtime == runtime and live(h, now) and load[h.host_id] < h.capacity
    ]
    if not candidates:
        return None
    best = min(candidates, key=lambda h: (mine[h.host_id], load[h.host_id], h.host_id))
    return best.host_id
