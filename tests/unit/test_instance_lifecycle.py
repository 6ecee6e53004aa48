"""The instance lifecycle's transition table and what each transition writes (pure; no registry)."""

from __future__ import annotations

import itertools
from typing import get_args

import msgspec
import pytest

from aube.shared import instance_lifecycle as lifecycle
from aube.shared.schemas import FunctionRecord, InstanceRecord, InstanceState, Manifest, ScalingSection

STATES: tuple[InstanceState, ...] = get_args(InstanceState)


def fn(version: int = 2, *, fresh: bool = False, deleting: bool = False) -> FunctionRecord:
    return FunctionRecord(
        name="f",
        version=version,
        manifest=Manifest(scaling=ScalingSection(fresh_per_stream=fresh)),
        artifact="x",
        runtime="process",
        created_at=0,
        updated_at=0,
        deleting=deleting,
    )


def rec(state: InstanceState = "free", **kw: object) -> InstanceRecord:
    base = InstanceRecord(
        function="f", slot=0, instance_id="i", version=2, state=state, runtime="process", owner="o", address="a:1"
    )
    if state == "busy":
        base = msgspec.structs.replace(base, claimed_by="p1", claimed_at=1.0)
    return msgspec.structs.replace(base, **kw)


def attempt(transition: lifecycle.Transition, r: InstanceRecord, instance_id: str | None = None) -> InstanceRecord:
    """Take `transition` with arguments that satisfy everything but the state rule (and `instance_id`)."""
    if transition == "started":
        return lifecycle.started(r, "a:1", "h", instance_id=instance_id)
    if transition == "mark_free":
        return lifecycle.mark_free(r, 5.0, instance_id=instance_id)
    if transition == "claim":
        return lifecycle.claim(r, "p1", 5.0, instance_id=instance_id)
    if transition == "hand_off":
        claim = msgspec.structs.replace(r, instance_id=instance_id or r.instance_id)
        return lifecycle.hand_off(r, claim, 65.0)
    if transition == "keep_claim":
        claim = msgspec.structs.replace(r, instance_id=instance_id or r.instance_id)
        return lifecycle.keep_claim(r, claim)
    if transition == "release":
        return lifecycle.release(r, fn(), 5.0, by="p1", instance_id=instance_id)
    if transition == "drain":
        return lifecycle.drain(r, busy_ok=True, instance_id=instance_id)
    if transition == "mark_unhealthy":
        return lifecycle.mark_unhealthy(r, by="p1", instance_id=instance_id)
    return lifecycle.retire(r, None, instance_id=instance_id)


@pytest.mark.parametrize(("transition", "state"), list(itertools.product(get_args(lifecycle.Transition), STATES)))
def test_every_transition_follows_the_table(transition: lifecycle.Transition, state: InstanceState) -> None:
    r = rec(state)
    if state in lifecycle.ALLOWED[transition]:
        attempt(transition, r)
    else:
        with pytest.raises(lifecycle.Refused):
            attempt(transition, r)


def test_every_transition_is_refused_on_another_instance_in_the_slot() -> None:
    for transition in get_args(lifecycle.Transition):
        for state in lifecycle.ALLOWED[transition]:
            attempt(transition, rec(state), instance_id="i")  # the same instance: allowed
            with pytest.raises(lifecycle.Refused, match="now holds instance"):
                attempt(transition, rec(state), instance_id="other")


def test_claim_marks_busy_by_proxy_and_holds_tells_that_claim_apart() -> None:
    claimed = lifecycle.claim(rec("free"), "p1", 123.0)
    assert (claimed.state, claimed.claimed_by, claimed.claimed_at) == ("busy", "p1", 123.0)
    assert lifecycle.holds(claimed, claimed)
    assert not lifecycle.holds(lifecycle.claim(rec("free"), "p1", 124.0), claimed)  # a later claim of ours
    assert not lifecycle.holds(lifecycle.claim(rec("free"), "p2", 123.0), claimed)  # another replica's
    assert not lifecycle.holds(rec("free"), claimed)  # the claim never landed


def test_release_frees_with_last_used_and_counts_the_stream() -> None:
    freed = lifecycle.release(rec("busy"), fn(), 50.0, by="p1")
    assert (freed.state, freed.claimed_by, freed.claimed_at, freed.last_used, freed.streams_served) == (
        "free",
        None,
        None,
        50.0,
        1,
    )


def test_hand_off_flags_only_the_very_claim_and_release_clears_it() -> None:
    busy = rec("busy")
    flagged = lifecycle.hand_off(busy, busy, 65.0)
    assert flagged.handed_off and lifecycle.holds(flagged, busy)  # the claim itself is unchanged
    assert flagged.handed_off_until == 65.0  # the end of its longest duration: the reaper's deadline should it die
    with pytest.raises(lifecycle.Refused):
        lifecycle.hand_off(busy, msgspec.structs.replace(busy, claimed_at=2.0), 65.0)  # another claim of the slot
    assert not lifecycle.release(flagged, fn(), 5.0, by="p1").handed_off
    assert not lifecycle.release(flagged, fn(fresh=True), 5.0, by="p1").handed_off
    assert lifecycle.release(flagged, fn(), 5.0, by="p1").handed_off_until is None


def test_keep_claim_clears_the_flag_and_keeps_the_very_claim() -> None:
    """After a handed-off stream the claimant keeps the instance (proxy/reserve.py): one write clears the flag (the
    reaper may then recycle the claim, which carries no stream, like a relayed one's) and keeps the claim, so the
    next client is served with no claim write and a later release still counts and clears as usual."""
    busy = rec("busy", streams_served=3)
    flagged = lifecycle.hand_off(busy, busy, 65.0)
    assert lifecycle.reusable(fn(), flagged)  # the relay's decision to keep applies to a handed-off claim as is
    kept = lifecycle.keep_claim(flagged, busy)
    assert kept == busy  # the claim as written, the flag gone, nothing counted yet
    assert lifecycle.holds(kept, busy) and lifecycle.holds(kept, flagged)
    assert lifecycle.hand_off(kept, kept, None).handed_off  # the next handed-off stream flags it again
    assert lifecycle.release(kept, fn(), 5.0, by="p1", streams=2).streams_served == 5
    with pytest.raises(lifecycle.Refused, match="no longer shows this claim"):
        lifecycle.keep_claim(flagged, msgspec.structs.replace(busy, claimed_at=2.0))  # another claim of the slot
    with pytest.raises(lifecycle.Refused, match="no longer shows this claim"):
        lifecycle.keep_claim(flagged, msgspec.structs.replace(busy, claimed_by="p2"))  # another replica's
    with pytest.raises(lifecycle.Refused):
        lifecycle.keep_claim(lifecycle.release(flagged, fn(), 5.0, by="p1"), busy)  # released meanwhile
    with pytest.raises(lifecycle.Refused):
        lifecycle.keep_claim(lifecycle.drain(flagged, busy_ok=True), busy)  # drained by the reaper meanwhile


def test_marking_a_handed_off_claim_unhealthy_or_draining_it_clears_the_flag() -> None:
    """A hung instance of a handed-off stream is marked unhealthy by its proxy: the flag must go with the claim, or
    the entry would read as a live handed-off stream (which the reaper leaves alone) for as long as it lasts."""
    busy = rec("busy")
    flagged = lifecycle.hand_off(busy, busy, 65.0)
    unhealthy = lifecycle.mark_unhealthy(flagged, by="p1")
    assert (unhealthy.state, unhealthy.claimed_by, unhealthy.handed_off, unhealthy.handed_off_until) == (
        "unhealthy",
        None,
        False,
        None,
    )
    drained = lifecycle.drain(flagged, busy_ok=True)
    assert (drained.state, drained.handed_off, drained.handed_off_until) == ("draining", False, None)


def test_release_drains_what_must_not_serve_again() -> None:
    busy = rec("busy")
    assert lifecycle.release(busy, fn(fresh=True), 5.0, by="p1").state == "draining"
    assert lifecycle.release(msgspec.structs.replace(busy, retire=True), fn(), 5.0, by="p1").state == "draining"
    assert lifecycle.release(busy, fn(version=3), 5.0, by="p1").state == "draining"
    assert lifecycle.release(busy, None, 5.0, by="p1").state == "draining"
    assert lifecycle.release(busy, fn(deleting=True), 5.0, by="p1").state == "draining"
    # fresh_per_stream only counts a stream that reached the instance.
    assert lifecycle.release(busy, fn(fresh=True), 5.0, by="p1", used=False).state == "free"


def test_only_the_claiming_proxy_releases_or_marks_a_busy_instance_unhealthy() -> None:
    with pytest.raises(lifecycle.Refused, match="claimed by p1"):
        lifecycle.release(rec("busy"), fn(), 1.0, by="p2")
    with pytest.raises(lifecycle.Refused, match="claimed by p1"):
        lifecycle.mark_unhealthy(rec("busy"), by="p2")
    assert lifecycle.mark_unhealthy(rec("free")).state == "unhealthy"


def test_a_stream_is_drained_only_when_asked_for_explicitly() -> None:
    with pytest.raises(lifecycle.Refused, match="carrying a stream"):
        lifecycle.drain(rec("busy"))
    drained = lifecycle.drain(rec("busy"), busy_ok=True)
    assert (drained.state, drained.claimed_by) == ("draining", None)


def test_mark_free_needs_an_address() -> None:
    with pytest.raises(lifecycle.Refused, match="no address"):
        lifecycle.mark_free(rec("starting", address=""), 1.0)
    started = lifecycle.started(rec("starting", address=""), "a:9", "h9")
    assert lifecycle.mark_free(started, 7.0).state == "free"


def test_the_earlier_retire_deadline_stands() -> None:
    assert lifecycle.retire(rec("busy"), 100.0).retire_deadline == 100.0
    assert lifecycle.retire(rec("busy", retire_deadline=50.0), 100.0).retire_deadline == 50.0
    assert lifecycle.retire(rec("busy", retire_deadline=50.0), None).retire_deadline == 50.0
    assert lifecycle.retire(rec("busy", retire_deadline=50.0), 10.0).retire_deadline == 10.0


def test_obsolete_is_one_rule_for_every_service() -> None:
    assert lifecycle.obsolete(rec(retire=True), fn())
    assert lifecycle.obsolete(rec(retire=True), None)
    assert lifecycle.obsolete(rec(version=1), fn(version=2))
    assert lifecycle.obsolete(rec(), fn(deleting=True))
    assert not lifecycle.obsolete(rec(), fn())
    # A version newer than the record (an upload still publishing it), or a record nobody can read: not obsolete.
    assert not lifecycle.obsolete(rec(version=3), fn(version=2))
    assert not lifecycle.obsolete(rec(), None)


def test_claimable_and_warm() -> None:
    assert lifecycle.claimable(fn(), rec("free"))
    assert not lifecycle.claimable(fn(), rec("free", address=""))
    assert not lifecycle.claimable(fn(), rec("free", retire=True))
    assert not lifecycle.claimable(fn(version=3), rec("free"))
    assert not lifecycle.claimable(fn(deleting=True), rec("free"))
    assert lifecycle.warm(fn(), rec("starting")) and lifecycle.warm(fn(), rec("free"))
    assert not lifecycle.warm(fn(), rec("busy")) and not lifecycle.warm(fn(version=3), rec("free"))


def test_a_kept_instance_is_reusable_exactly_when_a_release_would_free_it_for_the_current_version() -> None:
    held = lifecycle.claim(rec(), "p1", 1.0)
    assert lifecycle.reusable(fn(), held)
    assert lifecycle.release(held, fn(), 2.0, by="p1").state == "free"
    for function, kept in [
        (fn(fresh=True), held),  # a fresh instance per stream
        (fn(deleting=True), held),  # its function is being deleted
        (fn(version=3), held),  # a newer version is live
        (fn(), msgspec.structs.replace(held, retire=True)),  # marked to retire
        (None, held),  # no readable function record
    ]:
        assert not lifecycle.reusable(function, kept)
    released = lifecycle.release(held, fn(), 2.0, by="p1", streams=3)
    assert released.streams_served == held.streams_served + 3  # each stream it carried while kept
