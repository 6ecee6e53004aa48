"""The proxy's lease and its per-function scale intents, both kept in BUCKET_LEASES.

The lease says "this replica is alive": put before serving, renewed every ttl/3, deleted on clean shutdown.
A replica whose lease expires is dead to the reaper, which recycles the instances it had claimed.

A scale intent (key `scale-intent.<function>`) lets one replica per cooldown window ask the control plane for
instances, instead of every replica asking at once. It is created with `kv.create` (absent only), so exactly
one replica wins a window. Its value is a ProxyLease with ttl = cooldown, so anything that reads the bucket as
leases (the reaper) decodes it, sees it expire and may delete it; and a replica that finds an expired intent
takes it over by compare-and-set, so a crashed asker never blocks scaling for longer than one cooldown.
"""

from __future__ import annotations

import logging
import time

import anyio
from anyio.abc import TaskStatus
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError

from aube.shared import names, records
from aube.shared.registry import Registry
from aube.shared.schemas import ProxyLease, encode

log = logging.getLogger(__name__)


def scale_intent_key(function: str) -> str:
    return names.SCALE_INTENT_PREFIX + function


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
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Put the lease, report started, renew every ttl/3 (and at once when `renew_now` is set) until cancelled,
    then delete it (shielded, bounded)."""
    started_at = time.time()
    await registry.put_lease(
        ProxyLease(proxy_id=proxy_id, started_at=started_at, renewed_at=started_at, ttl=ttl, address=address)
    )
    task_status.started()
    try:
        while True:
            if renew_now is None:
                await anyio.sleep(ttl / 3)
            else:
                await renew_now.wait(ttl / 3)
            now = time.time()
            try:
                await registry.put_lease(
                    ProxyLease(proxy_id=proxy_id, started_at=started_at, renewed_at=now, ttl=ttl, address=address)
                )
            except Exception as e:  # a NATS hiccup: the next renewal may succeed before the lease expires
                log.warning("lease renewal failed: %s", e)
    finally:
        with anyio.move_on_after(5, shield=True):
            await registry.delete_lease(proxy_id)
            log.info("lease %s deleted", proxy_id)


async def take_scale_intent(registry: Registry, function: str, proxy_id: str, cooldown: float) -> bool:
    """True if this replica may ask to scale `function` now; False if another asked within the cooldown."""
    kv = registry.leases_kv
    key = scale_intent_key(function)
    now = time.time()
    value = encode(ProxyLease(proxy_id=key, started_at=now, renewed_at=now, ttl=cooldown, address=proxy_id))
    try:
        await kv.create(key, value)
        return True
    except KeyWrongLastSequenceError:
        pass
    try:
        entry = await kv.get(key)
    except (KeyNotFoundError, NotFoundError):  # deleted meanwhile (the reaper): next time create wins
        return False
    held = records.read(key, entry.value, ProxyLease) if entry.value else None
    if held is not None and held.renewed_at + held.ttl > now:
        return False
    try:
        await kv.update(key, value, last=entry.revision)
        return True
    except KeyWrongLastSequenceError:
        log.debug("lost race taking over scale intent %s", key)
        return False
