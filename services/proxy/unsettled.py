"""Claims and releases whose outcome the proxy could not learn: settled once the registry answers again.

A compare-and-set that times out (NATS away, or a leader change) may still land later. A claim written that way
would leave an instance `busy` with no stream for as long as this replica's lease lives (reliability finding 3:
12 minutes and more, until the proxy stopped), and a release that failed leaves it busy as well. So neither is
guessed: each is remembered here with the exact claim it concerns (`claimed_by`, `claimed_at`), and once the
registry can be read, an entry that still shows that claim, and is not a stream this replica carries, is released.
An entry showing anything else (the write never landed, or someone moved on) is forgotten.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Container

import anyio
import msgspec

from aube.shared.registry import Registry
from aube.shared.schemas import InstanceRecord

log = logging.getLogger(__name__)

SETTLE_INTERVAL = 1.0


class Unknown(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    claim: InstanceRecord  # the entry as this replica wrote (or would have written) its claim
    used: bool  # a stream ran on it (a failed release) or not (a claim that may have landed unseen)


def still_ours(current: InstanceRecord | None, unknown: Unknown) -> bool:
    """Whether the entry read now still carries the claim whose outcome was unknown."""
    return (
        current is not None
        and current.state == "busy"
        and current.instance_id == unknown.claim.instance_id
        and current.claimed_by == unknown.claim.claimed_by
        and current.claimed_at == unknown.claim.claimed_at
    )


class Unsettled:
    def __init__(self) -> None:
        self.pending: dict[str, Unknown] = {}

    def add(self, key: str, claim: InstanceRecord, *, used: bool) -> None:
        self.pending[key] = Unknown(key=key, claim=claim, used=used)

    async def settle(
        self,
        registry: Registry,
        held: Container[str],
        release: Callable[[str, int, InstanceRecord, bool], Awaitable[None]],
    ) -> None:
        """One pass: release what still shows an unknown claim; keep what cannot be read yet."""
        for key, unknown in list(self.pending.items()):
            if key in held:  # a new claim of this replica's on the same key: not ours to settle
                self.pending.pop(key, None)
                continue
            try:
                entry = await registry.get_instance(key)
            except Exception as e:  # still unreachable: next pass
                log.debug("cannot settle %s yet: %s", key, e)
                return
            self.pending.pop(key, None)
            if entry is not None and still_ours(entry.record, unknown):
                log.info("settling %s: a claim whose outcome was unknown had landed; releasing it", key)
                await release(key, entry.revision, entry.record, unknown.used)

    async def run(
        self,
        registry: Registry,
        held: Container[str],
        release: Callable[[str, int, InstanceRecord, bool], Awaitable[None]],
    ) -> None:
        while True:
            await anyio.sleep(SETTLE_INTERVAL)
            if self.pending:
                try:
                    await self.settle(registry, held, release)
                except Exception:  # a bug must not end the loop that keeps instances from staying stuck
                    log.exception("settling unknown claims failed")
