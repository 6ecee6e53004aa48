from __future__ import annotations

import msgspec

from aube.proxy.unsettled import Pending, still_ours
from aube.shared.schemas import InstanceRecord


def record(**kw: object) -> InstanceRecord:
    base: dict[str, object] = dict(
        function="f", slot=0, instance_id="i", version=1, state="busy", runtime="process", owner="o",
        claimed_by="p1", claimed_at=100.0,
    )  # fmt: skip
    return msgspec.convert({**base, **kw}, InstanceRecord)


def test_only_the_exact_claim_whose_outcome_was_unknown_is_settled() -> None:
    unknown = Pending(key="f.0", claim=record(), used=False)
    assert still_ours(record(), unknown)
    assert not still_ours(None, unknown)  # the entry is gone
    assert not still_ours(record(state="free"), unknown)  # the write never landed
    assert not still_ours(record(claimed_by="p2"), unknown)  # another replica's claim
    assert not still_ours(record(claimed_at=101.0), unknown)  # a later claim of ours: a live stream
    assert not still_ours(record(instance_id="j"), unknown)  # a new instance in the slot
