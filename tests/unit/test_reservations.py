"""Pure reservation decisions (proxy/decisions.py): how many free instances a replica reserves ahead of demand, and
when it gives one back."""

from __future__ import annotations

import msgspec

from aube.proxy import decisions
from aube.proxy.decisions import PoolCounts
from aube.shared import instance_lifecycle as lifecycle
from aube.shared.registry import InstanceEntry
from aube.shared.schemas import FunctionRecord, InstanceRecord, Manifest, ScalingSection


def _fn(version: int = 2, *, max_instances: int = 10, deleting: bool = False) -> FunctionRecord:
    return FunctionRecord(
        name="f",
        version=version,
        manifest=Manifest(scaling=ScalingSection(min_free=1, max_instances=max_instances)),
        artifact="x",
        runtime="process",
        created_at=0,
        updated_at=0,
        deleting=deleting,
    )


def _free(version: int = 2) -> InstanceEntry:
    rec = InstanceRecord(
        function="f",
        slot=0,
        instance_id="i0",
        version=version,
        state="free",
        runtime="process",
        owner="o",
        address="127.0.0.1:9000",
    )
    return InstanceEntry("f.0", 10, rec)


def _reserved(version: int = 2, proxy: str = "p1") -> InstanceEntry:
    """The claim this replica wrote (revision 11), as it holds it."""
    free = _free(version)
    return InstanceEntry("f.0", 11, lifecycle.claim(free.record, proxy, 100.0))


# -- how many to take --------------------------------------------------------------------------------------------


def test_takes_up_to_the_setting_from_the_free_ones() -> None:
    fn = _fn()
    assert decisions.reservations_to_take(fn, PoolCounts(free=3, total=3), held=0, setting=1) == 1
    assert decisions.reservations_to_take(fn, PoolCounts(free=3, total=3), held=0, setting=2) == 2
    assert decisions.reservations_to_take(fn, PoolCounts(free=1, total=3), held=0, setting=2) == 1
    assert decisions.reservations_to_take(fn, PoolCounts(free=0, starting=2, total=3), held=0, setting=2) == 0


def test_what_is_held_counts_toward_the_setting() -> None:
    fn = _fn()
    assert decisions.reservations_to_take(fn, PoolCounts(free=3, total=5), held=1, setting=2) == 1
    assert decisions.reservations_to_take(fn, PoolCounts(free=3, total=5), held=2, setting=2) == 0
    assert decisions.reservations_to_take(fn, PoolCounts(free=3, total=5), held=4, setting=2) == 0  # kept after streams


def test_none_when_off_deleted_or_at_the_cap() -> None:
    assert decisions.reservations_to_take(_fn(), PoolCounts(free=3, total=3), held=0, setting=0) == 0
    assert decisions.reservations_to_take(_fn(deleting=True), PoolCounts(free=3, total=3), held=0, setting=1) == 0
    # At max_instances the function cannot grow: a free instance may be what another replica's client waits for.
    capped = _fn(max_instances=3)
    assert decisions.reservations_to_take(capped, PoolCounts(free=3, total=3), held=0, setting=1) == 0
    assert decisions.reservations_to_take(capped, PoolCounts(free=2, total=2), held=0, setting=1) == 1


# -- keep or give back -------------------------------------------------------------------------------------------


def test_kept_while_the_entry_shows_our_claim_or_lags_behind_it() -> None:
    held = _reserved()
    assert decisions.reservation_fate(_fn(), held, held) == "keep"
    # The watch has not delivered our claim yet: the view still shows the entry free at the older revision.
    assert decisions.reservation_fate(_fn(), held, _free()) == "keep"


def test_given_back_when_a_new_version_is_live_or_it_is_retired() -> None:
    held = _reserved(version=1)
    assert decisions.reservation_fate(_fn(version=2), held, held) == "give_back"
    retired = InstanceEntry("f.0", 12, lifecycle.retire(_reserved().record, None))
    assert decisions.reservation_fate(_fn(), _reserved(), retired) == "give_back"


def test_given_back_when_the_function_is_deleted() -> None:
    held = _reserved()
    assert decisions.reservation_fate(None, held, held) == "give_back"
    assert decisions.reservation_fate(_fn(deleting=True), held, held) == "give_back"


def test_forgotten_when_the_entry_is_gone_or_changed_under_us() -> None:
    held = _reserved()
    assert decisions.reservation_fate(_fn(), held, None) == "forget"
    other = InstanceEntry("f.0", 20, msgspec.structs.replace(held.record, instance_id="i9"))
    assert decisions.reservation_fate(_fn(), held, other) == "forget"
    # The reaper judged this replica dead and drained its claims; or the instance was marked unhealthy.
    drained = InstanceEntry("f.0", 12, lifecycle.drain(held.record, busy_ok=True))
    assert decisions.reservation_fate(_fn(), held, drained) == "forget"
    unhealthy = InstanceEntry("f.0", 12, lifecycle.mark_unhealthy(held.record, by="p1"))
    assert decisions.reservation_fate(_fn(), held, unhealthy) == "forget"
    # A newer revision showing someone else's claim (ours was lost and the instance claimed again).
    theirs = InstanceEntry("f.0", 13, lifecycle.claim(_free().record, "p2", 101.0))
    assert decisions.reservation_fate(_fn(), held, theirs) == "forget"


def test_unhealthy_wins_over_a_new_version() -> None:
    """Nothing to release once someone else moved the entry on, even if the function changed too."""
    held = _reserved(version=1)
    unhealthy = InstanceEntry("f.0", 12, lifecycle.mark_unhealthy(held.record, by="p1"))
    assert decisions.reservation_fate(_fn(version=2), held, unhealthy) == "forget"


def test_none_for_a_function_without_a_warm_pool() -> None:
    """min_free 0: no keeper tops up what a reservation takes; a free instance is a waiting client's scale-out."""
    fn = msgspec.structs.replace(_fn(), manifest=Manifest(scaling=ScalingSection(min_free=0, max_instances=10)))
    pool = PoolCounts(free=3, total=3)
    assert decisions.reservation_target(fn, pool, 2) == 0
    assert decisions.reservations_to_take(fn, pool, held=0, setting=2) == 0
    assert decisions.reservation_target(_fn(), pool, 2) == 2
    assert decisions.reservation_target(None, pool, 2) == 0
    assert decisions.reservation_target(_fn(deleting=True), pool, 2) == 0


def test_none_held_at_the_cap() -> None:
    """At max_instances even what is held (kept after a stream) goes back, past AUBE_RESERVE_SECONDS."""
    capped = _fn(max_instances=2)
    assert decisions.reservation_target(capped, PoolCounts(free=0, total=2), 1) == 0
    assert decisions.reservation_target(capped, PoolCounts(free=0, starting=1, total=1), 1) == 1
