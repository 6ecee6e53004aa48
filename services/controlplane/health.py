"""Health checks of a starting instance: an HTTP GET of the in-instance server's health path until it answers 200.

A TCP connect alone proves nothing under Docker: the engine's port proxy accepts connections before the
container listens. So the check reads the HTTP status line.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from aube.shared import addresses, instance_health
from aube.shared.errors import HealthCheckFailed


async def probe(address: str, instance_id: str | None = None, timeout: float = 2.0, secret: str = "") -> bool:
    """One health request; True only for an HTTP 200 answer from the instance named `instance_id` (if given).

    Checking the identity guards the registry against an address that leads to another instance than the one
    being registered (a port reused, a stale mapping): an entry must never send streams to someone else's instance.
    The instance answers only a request carrying its credential `secret` (403 otherwise), which proves the same.
    """
    answer = await instance_health.read(address, secret, timeout)
    return answer is not None and (instance_id is None or answer.get("instance") == instance_id)


# A probe is one loopback connection: cheap enough to repeat every 20 ms, which keeps a cold start within 20 ms
# of the instance's first moment of health. Asking the runtime whether the instance still lives costs more (a
# Docker inspect), so that is done a few times a second only.
PROBE_INTERVAL = 0.02
ALIVE_INTERVAL = 0.25


async def wait_healthy(
    address: str, instance_id: str, timeout: float, alive: Callable[[], Awaitable[bool]], secret: str = ""
) -> None:
    """Return once `address` is healthy; HealthCheckFailed when the deadline passes or the instance dies first."""
    with anyio.move_on_after(timeout):
        next_alive_check = anyio.current_time() + ALIVE_INTERVAL
        while True:
            if await probe(address, instance_id, secret=secret):
                return
            if anyio.current_time() >= next_alive_check:
                if not await alive():
                    where = addresses.public(address)  # a reply: never a host path
                    raise HealthCheckFailed(f"instance at {where} exited before it became healthy")
                next_alive_check = anyio.current_time() + ALIVE_INTERVAL
            await anyio.sleep(PROBE_INTERVAL)
    where = addresses.public(address)
    raise HealthCheckFailed(f"instance {instance_id} at {where} did not pass its health check within {timeout:g}s")
