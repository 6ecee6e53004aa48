"""The proxy's lease, kept in BUCKET_LEASES.

The lease says "this replica is alive": put before serving, renewed every ttl/3, deleted on clean shutdown.
A replica whose lease expires is dead to the reaper, which recycles the instances it had claimed.
(Scale intents have a bucket of their own: Registry.take_scale_intent.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus

from aube.shared import leasing
from aube.shared.registry import Registry
from aube.shared.schemas import ProxyLease

log = logging.getLogger(__name__)


class LeaseClock:
    """When this replica's lease last landed: kept instances (reserve.py) are handed out only while it is fresh."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.last = float("-inf")

    def renewed(self) -> None:
        self.last = time.monotonic()

    def fresh(self) -> bool:
        return time.monotonic() - self.last < self.ttl / 2


class RenewSignal:
    """Set from the NATS client's reconnect callback: the lease is renewed at once, not at its next tick. Reapers
    judge a lease on time they could watch it (reaper/decisions.py), so after an outage the sooner a fresh revision
    shows, the surer a live replica is never taken for a dead one."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> None:
        """Return when set (and re-arm) or after `timeout`."""
        with anyio.move_on_after(timeout):
            await self._event.wait()
        if self._event.is_set():
            self._event = anyio.Event()


async def keep_lease(
    registry: Registry,
    proxy_id: str,
    ttl: float,
    address: str = "",
    *,
    renew_now: RenewSignal | None = None,
    renewed: Callable[[], None] | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Put the lease, report started, renew every ttl/3 (and at once when `renew_now` is set) until cancelled,
    then delete it (shielded, bounded). `renewed` is called after each put that landed."""
    started_at = time.time()
    await registry.put_lease(
        ProxyLease(proxy_id=proxy_id, started_at=started_at, renewed_at=started_at, ttl=ttl, address=address)
    )
    if renewed is not None:
        renewed()
    task_status.started()

    async def put() -> None:
        now = time.time()
        await registry.put_lease(
            ProxyLease(proxy_id=proxy_id, started_at=started_at, renewed_at=now, ttl=ttl, address=address)
        )
        if renewed is not None:
            renewed()

    try:
        await leasing.renew_forever(put, ttl, "lease", wait=renew_now.wait if renew_now is not None else anyio.sleep)
    finally:
        with anyio.move_on_after(5, shield=True):
            await registry.delete_lease(proxy_id)
            log.info("lease %s deleted", proxy_id)
