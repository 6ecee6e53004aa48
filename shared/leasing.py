"""Renewing a lease (a proxy's in aube-leases, a host agent's in aube-hosts): the one loop both keep.

A lease is renewed every ttl/3. A renewal that fails (NATS away, a bucket between leaders) is tried again every
RETRY_AFTER_FAILURE seconds rather than at the next tick: a reaper counts a lease's age only over time it could
read the registry, so once the bucket answers again, the sooner a fresh revision lands, the surer a live holder is
never judged dead (measured on the rig: a partitioned leader left the buckets unwritable for about 6 s of a 6 s
ttl, and a renewal that then waited a full tick landed after the reaper's judgement).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import NoReturn

import anyio

log = logging.getLogger(__name__)

RETRY_AFTER_FAILURE = 0.5


async def renew_forever(
    put: Callable[[], Awaitable[object]],
    ttl: float,
    what: str,
    *,
    wait: Callable[[float], Awaitable[None]] = anyio.sleep,
) -> NoReturn:
    """Call `put` every ttl/3 (after `wait(delay)`, which may return early: a reconnect asks for a renewal at once)
    until cancelled; after a failure, again every RETRY_AFTER_FAILURE seconds until one succeeds."""
    delay = ttl / 3
    while True:
        await wait(delay)
        try:
            await put()
        except Exception as e:  # a NATS hiccup: retried soon, before the lease expires
            log.warning("%s renewal failed, trying again in %gs: %s", what, RETRY_AFTER_FAILURE, e)
            delay = min(RETRY_AFTER_FAILURE, ttl / 3)
        else:
            delay = ttl / 3
