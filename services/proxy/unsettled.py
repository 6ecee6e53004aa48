"""Claims and releases whose outcome the proxy could not learn: settled once the registry answers again.

A compare-and-set that times out (NATS away, or a leader change) may still land later. A claim written that way
would leave an instance `busy` with no stream for as long as this replica's lease lives (reliability finding 3:
12 minutes and more, until the proxy stopped), and a release that failed leaves it busy as well. So neither is
guessed: each is remembered here with the exact claim it concerns (`claimed_by`, `claimed_at`), and once the
registry can be read, an entry that still shows that claim, and is not a stream this replica carries, is released
(or marked unhealthy, when that was the write whose outcome was lost).
An entry showing anything else (the write never landed, or someone moved on) is forgotten.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Container
from typing import Literal

import anyio
import msgspec

from aube.shared.instance_lifecycle import holds
from aube.shared.registry import Registry
from aube.shared.schemas import InstanceRecord

log = logging.getLogger(__name__)

SETTLE_INTERVAL = 1.0


# What a claim still showing in the registry becomes: released (to free, or draining when it must not serve
# again), or marked unhealthy (the proxy could not reach the instance, or its handler did not finish).
Settlement = Literal["release", "unhealthy"]


class Pending(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    claim: InstanceRecord  # the entry as this replica wrote (or would have written) its claim
    used: bool  # a stream ran on it (a failed release) or not (a claim that may have landed unseen)
    then: Settlement = "release"


def still_ours(current: InstanceRecord | None, pending: Pending) -> bool:
    """Whether the entry read now still carries the claim whose outcome was unknown."""
    return current is not None and holds(current, pending.claim)


class Unsettled:
    def __init__(self) -> None:
        self.pending: dict[str, Pending] = {}

    def add(self, key: str, claim: InstanceRecord, *, used: bool, then: Settlement = "release") -> None:
        self.pending[key] = Pending(key=key, claim=claim, used=used, then=then)

    async def settle_once(
        self,
        registry: Registry,
        held: Container[str],
        settle: Callable[[Pending, int, InstanceRecord], Awaitable[None]],
    ) -> None:
        """One pass: release what still shows an unknown claim; keep what cannot be read yet."""
        for key, pending in list(self.pending.items()):
            if key in held:  # a new claim of this replica's on the same key: not ours to settle
                self.pending.pop(key, None)
                continue
            try:
                entry = await registry.get_instance(key)
            except Exception as e:  # still unreachable: next pass
                log.debug("cannot settle %s yet: %s", key, e)
                return
            self.pending.pop(key, None)
            if entry is not None and still_ours(entry.record, pending):
                log.info("settling %s: a claim whose outcome was unknown had landed (%s)", key, pending.then)
                await settle(pending, entry.revision, entry.record)

    async def run(
        self,
        registry: Registry,
        held: Container[str],
        settle: Callable[[Pending, int, InstanceRecord], Awaitable[None]],
    ) -> None:
        while True:
            await anyio.sleep(SETTLE_INTERVAL)
            if self.pending:
                try:
                    await self.settle_once(registry, held, settle)
                except Exception:  # a bug must not end the loop that keeps instances from staying stuck
                    log.exception("settling unknown claims failed")
