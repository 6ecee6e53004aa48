"""A lease renewal that fails is tried again soon, not a full ttl/3 later (shared/leasing.py)."""

from __future__ import annotations

import anyio
import pytest

from aube.shared import leasing

pytestmark = pytest.mark.anyio


async def test_a_failed_renewal_is_retried_soon_and_then_the_ticks_resume() -> None:
    outcomes = [True, False, False, True, True]  # the second and third renewals fail
    delays: list[float] = []
    puts = 0

    async def put() -> None:
        nonlocal puts
        puts += 1
        if not outcomes[puts - 1]:
            raise TimeoutError("nats: no response from stream")

    async def wait(delay: float) -> None:
        delays.append(delay)
        if len(delays) > len(outcomes):
            raise anyio.get_cancelled_exc_class()()

    with pytest.raises(anyio.get_cancelled_exc_class()):
        await leasing.renew_forever(put, 6.0, "lease", wait=wait)
    assert delays == [2.0, 2.0, 0.5, 0.5, 2.0, 2.0]
