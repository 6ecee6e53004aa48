"""The instance lifecycle, in one place: its states, which transitions are allowed, and what each one writes.

Pure: no I/O. Every service that changes an instance entry (the proxy claims and releases, the control plane starts,
frees, drains and retires, the reaper drains) builds the new record with one function of this module, and writes it
with `Registry.apply` (shared/registry.py), the one compare-and-set loop. A transition that the entry's current
record does not allow raises `Refused`: the writer lost to someone (a claim, a drain) and must decide again, never
overwrite.

    starting --mark_free--> free --claim--> busy --release--> free
        |                    |                |  \\--release (obsolete, fresh_per_stream)--> draining
        |                    |                \\--mark_unhealthy--> unhealthy --drain--> draining
        \\--drain--> draining <--drain--------/ (busy only when its proxy is dead or its grace is over)
    draining: the control plane that owns the instance stops it and deletes the entry (the only way out).
    busy --hand_off--> busy, flagged `handed_off`; --keep_claim--> busy, unflagged (kept after that stream ended, by
    a proxy whose instance cannot hold a kept claim's control connection; one that can stays flagged, unwritten).

`retire` is a flag, not a state: a busy instance of a retired version finishes its stream and is then drained by its
release instead of freed; `retire_deadline` is when a delete's grace ends.

Which instances are obsolete (serve no new stream) is also decided here, once, for the control plane's retirement
and the reaper's reaping alike (`obsolete`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from aube.shared.schemas import FunctionRecord, InstanceRecord, InstanceState

Transition = Literal[
    "started", "mark_free", "claim", "hand_off", "keep_claim", "release", "drain", "mark_unhealthy", "retire"
]

# The allowed transitions: from which states each one may be taken. `release` ends in "free" or "draining" (see
# `release`); `retire` keeps the state and sets the flag.
ALLOWED: Mapping[Transition, frozenset[InstanceState]] = {
    "started": frozenset({"starting"}),
    "mark_free": frozenset({"starting"}),
    "claim": frozenset({"free"}),
    "hand_off": frozenset({"busy"}),
    "keep_claim": frozenset({"busy"}),
    "release": frozenset({"busy"}),
    "drain": frozenset({"free", "busy", "unhealthy", "draining", "starting"}),
    "mark_unhealthy": frozenset({"busy", "free"}),
    "retire": frozenset({"starting", "free", "busy", "unhealthy", "draining"}),
}


class Refused(Exception):
    """The entry's current record does not allow the transition (someone else moved it): decide again."""

    def __init__(self, transition: Transition, record: InstanceRecord, why: str) -> None:
        super().__init__(f"{transition} of {record.function}.{record.slot} ({record.instance_id}): {why}")
        self.transition = transition
        self.record = record
        self.why = why


def _check(transition: Transition, rec: InstanceRecord, instance_id: str | None) -> None:
    if instance_id is not None and rec.instance_id != instance_id:
        raise Refused(transition, rec, f"the slot now holds instance {rec.instance_id}")
    if rec.state not in ALLOWED[transition]:
        raise Refused(transition, rec, f"not allowed from {rec.state}")


# -- the transitions -------------------------------------------------------------------------------------------


def mark_free(rec: InstanceRecord, now: float, *, instance_id: str | None = None) -> InstanceRecord:
    """starting -> free: healthy, and its version is live (or it was started by a scale-out of the live version)."""
    _check("mark_free", rec, instance_id)
    if not rec.address:
        raise Refused("mark_free", rec, "it has no address yet")
    return msgspec.structs.replace(rec, state="free", last_used=now)


def started(
    rec: InstanceRecord,
    address: str,
    handle: str,
    *,
    host: str = "",
    instance_id: str | None = None,
    handoff: str = "",
) -> InstanceRecord:
    """starting -> starting, now with the address, handle, host (and handoff socket) the runtime gave it (not
    claimable yet)."""
    _check("started", rec, instance_id)
    return msgspec.structs.replace(rec, address=address, handle=handle, host=host, handoff=handoff)


def claim(rec: InstanceRecord, proxy_id: str, now: float, *, instance_id: str | None = None) -> InstanceRecord:
    """free -> busy, held by `proxy_id` from `now`: that pair is what says "this claim is mine" after a timeout."""
    _check("claim", rec, instance_id)
    return msgspec.structs.replace(rec, state="busy", claimed_by=proxy_id, claimed_at=now)


def holds(rec: InstanceRecord, claim_record: InstanceRecord) -> bool:
    """Whether `rec` still shows the very claim `claim_record` wrote (same instance, proxy and claim time)."""
    return (
        rec.state == "busy"
        and rec.instance_id == claim_record.instance_id
        and rec.claimed_by == claim_record.claimed_by
        and rec.claimed_at == claim_record.claimed_at
    )


def hand_off(rec: InstanceRecord, claim_record: InstanceRecord, until: float | None) -> InstanceRecord:
    """The claimant handed the client's socket to the instance, whose stream may last `until` (None: no longest
    duration): flag its claim (`InstanceRecord.handed_off`, `handed_off_until`)."""
    _check("hand_off", rec, claim_record.instance_id)
    if not holds(rec, claim_record):
        raise Refused("hand_off", rec, "it no longer shows this claim")
    return msgspec.structs.replace(rec, handed_off=True, handed_off_until=until)


def keep_claim(rec: InstanceRecord, claim_record: InstanceRecord) -> InstanceRecord:
    """The handed-off stream ended and the claimant keeps the instance for its next client (proxy/reserve.py), as
    after a relayed stream: the claim stays, its `handed_off` flag goes (no stream lives on in the instance, so the
    reaper may recycle the claim should its proxy die, as a relayed one's). Streams are counted at the release.
    Only for an instance that does not hold a kept claim's control connection (an older one): one that does keeps
    the flag, with no write, and exits should its proxy die (docs/handoff.md)."""
    _check("keep_claim", rec, claim_record.instance_id)
    if not holds(rec, claim_record):
        raise Refused("keep_claim", rec, "it no longer shows this claim")
    return msgspec.structs.replace(rec, handed_off=False, handed_off_until=None)


def release(
    rec: InstanceRecord,
    fn: FunctionRecord | None,
    now: float,
    *,
    by: str,
    used: bool = True,
    instance_id: str | None = None,
    streams: int = 1,
) -> InstanceRecord:
    """busy -> free, or -> draining when it must not serve again: it is obsolete, or the function wants a fresh
    instance per stream (only when the stream reached it: `used`). Only the proxy holding the claim releases it.
    `streams`: how many streams it carried under this claim (a proxy keeps an instance between streams)."""
    _check("release", rec, instance_id)
    if rec.claimed_by != by:
        raise Refused("release", rec, f"claimed by {rec.claimed_by}, not {by}")
    fresh = fn is not None and fn.manifest.scaling.fresh_per_stream and used
    if fn is None or obsolete(rec, fn) or fresh:
        return _unclaimed(rec, "draining")
    return _unclaimed(rec, "free", last_used=now, streams_served=rec.streams_served + (streams if used else 0))


def _unclaimed(rec: InstanceRecord, state: InstanceState, **changes: Any) -> InstanceRecord:
    """`rec` in `state` with no claim: the claimant, its time and its handoff go together."""
    return msgspec.structs.replace(
        rec, state=state, claimed_by=None, claimed_at=None, handed_off=False, handed_off_until=None, **changes
    )


def drain(rec: InstanceRecord, *, busy_ok: bool = False, instance_id: str | None = None) -> InstanceRecord:
    """-> draining: it will be stopped. A busy one only with `busy_ok` (its proxy is dead, or its grace is over);
    otherwise a claim that won meanwhile makes the drain lose, so no stream is ever cut by a stale decision."""
    _check("drain", rec, instance_id)
    if rec.state == "busy" and not busy_ok:
        raise Refused("drain", rec, "it is carrying a stream")
    return _unclaimed(rec, "draining")


def mark_unhealthy(rec: InstanceRecord, *, by: str | None = None, instance_id: str | None = None) -> InstanceRecord:
    """busy/free -> unhealthy: it could not be reached or did not finish its stream; never handed out again. A busy
    one only by the proxy holding it (`by`). The claim goes, and its `handed_off` flag with it: a flag says a live
    claim's stream lives on in the instance (the reaper leaves such an entry alone), and this one is to be stopped."""
    _check("mark_unhealthy", rec, instance_id)
    if rec.state == "busy" and rec.claimed_by != by:
        raise Refused("mark_unhealthy", rec, f"claimed by {rec.claimed_by}")
    return _unclaimed(rec, "unhealthy")


def retire(rec: InstanceRecord, deadline: float | None, *, instance_id: str | None = None) -> InstanceRecord:
    """Set the retire flag: its stream (if any) finishes, then it is drained instead of freed. An earlier deadline
    stands: a re-upload (no deadline) during a delete's grace must not let the deleted version stream on for ever."""
    _check("retire", rec, instance_id)
    kept = rec.retire_deadline
    if kept is not None:
        deadline = kept if deadline is None else min(kept, deadline)
    return msgspec.structs.replace(rec, retire=True, retire_deadline=deadline)


# -- what an instance is worth ---------------------------------------------------------------------------------


def obsolete(rec: InstanceRecord, fn: FunctionRecord | None) -> bool:
    """It must serve no new stream: marked to retire, its function is being deleted, or a newer version is live.

    Not obsolete: an instance of a version newer than the record (an upload still publishing it) and one whose
    function has no readable record (not published yet, or written by a newer service): both are left to the idle
    timeout, never stopped at once, so a mixed-version platform does not stop what it cannot read.
    """
    if rec.retire:
        return True
    return fn is not None and (fn.deleting or rec.version < fn.version)


def claimable(fn: FunctionRecord, rec: InstanceRecord) -> bool:
    """A client of `fn` may be sent here now."""
    return (
        not fn.deleting
        and rec.function == fn.name
        and rec.state == "free"
        and rec.version == fn.version
        and not rec.retire
        and bool(rec.address)
    )


def reusable(fn: FunctionRecord | None, rec: InstanceRecord) -> bool:
    """The replica holding `rec` may hand it to its next client without releasing it (proxy/reserve.py): what
    `release` would make free, and `claimable` would then allow."""
    return (
        fn is not None
        and not fn.deleting
        and not fn.manifest.scaling.fresh_per_stream
        and rec.function == fn.name
        and rec.version == fn.version
        and not rec.retire
        and bool(rec.address)
    )


def warm(fn: FunctionRecord, rec: InstanceRecord) -> bool:
    """Counts toward `min_free`: free or starting, of the live version, not retiring."""
    return (
        rec.function == fn.name and rec.version == fn.version and not rec.retire and rec.state in ("free", "starting")
    )


def awaiting_stop(rec: InstanceRecord) -> bool:
    """Someone decided to stop it (draining) or it failed (unhealthy): only its control plane's stop is left."""
    return rec.state in ("draining", "unhealthy")
