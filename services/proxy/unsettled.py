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
    # A claim's: the revision its write named. While the entry is still there, the write may land yet (it waits in
    # nats-py's reconnect buffer, or with a leader that lost its quorum): the entry is fenced so it never does.
    revision: int | None = None


def still_ours(current: InstanceRecord | None, pending: Pending) -> bool:
    """Whether the entry read now still carries the claim whose outcome was unknown."""
    return current is not None and holds(current, pending.claim)


class Unsettled:
    def __init__(self) -> None:
        # By key and claim time: a client retrying through an outage may leave several unknown claims on one key.
        self.pending: dict[tuple[str, float | None], Pending] = {}

    def add(
        self,
        key: str,
        claim: InstanceRecord,
        *,
        used: bool,
        then: Settlement = "release",
        revision: int | None = None,
    ) -> None:
        self.pending[(key, claim.claimed_at)] = Pending(key=key, claim=claim, used=used, then=then, revision=revision)

    async def settle_once(
        self,
        registry: Registry,
        held: Container[str],
        settle: Callable[[Pending, int, InstanceRecord], Awaitable[None]],
    ) -> None:
        """One pass: release what still shows an unknown claim, fence a claim that may still land; keep what cannot
        be read yet."""
        for ident, pending in list(self.pending.items()):
            key = pending.key
            if key in held:  # a newer claim of this replica's on the same key: nothing older can land any more
                self.pending.pop(ident, None)
                continue
            try:
                entry = await registry.get_instance(key)
                if entry is not None and still_ours(entry.record, pending):
                    self.pending.pop(ident, None)
                    log.info("settling %s: a claim whose outcome was unknown had landed (%s)", key, pending.then)
                    await settle(pending, entry.revision, entry.record)
                    continue
                if entry is not None and entry.revision == pending.revision and not await registry.fence(entry):
                    continue  # it moved meanwhile (the claim itself, maybe): read again next pass
            except Exception as e:  # still unreachable: next pass
                log.debug("cannot settle %s yet: %s", key, e)
                return
            self.pending.pop(ident, None)

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
