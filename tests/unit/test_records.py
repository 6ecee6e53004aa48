from __future__ import annotations

import msgspec
import pytest

from aube.shared import names, records
from aube.shared.schemas import FunctionRecord, InstanceRecord, Manifest, ProxyLease, ScaleIntent


def instance(**kw: object) -> InstanceRecord:
    base: dict[str, object] = dict(
        function="f", slot=0, instance_id="i", version=1, state="free", runtime="process", owner="o"
    )
    return msgspec.convert({**base, **kw}, InstanceRecord)


def function(**kw: object) -> FunctionRecord:
    base = FunctionRecord(
        name="f", version=1, manifest=Manifest(), artifact="a", runtime="process", created_at=0, updated_at=0
    )
    return msgspec.structs.replace(base, **kw)


@pytest.mark.parametrize(
    "address", ["127.0.0.1:8080", "[::1]:80", "host-1.local:65535", "unix:/run/aube/x/instance.sock", ""]
)
def test_addresses_a_runtime_writes_are_valid(address: str) -> None:
    assert records.valid_address(address)


@pytest.mark.parametrize(
    "address", ["127.0.0.1:0", "h:65536", "h", "unix:relative", "unix:/a/../etc", "h:80/x", "a b:1", "x" * 300 + ":1"]
)
def test_impossible_addresses_are_not(address: str) -> None:
    assert not records.valid_address(address)


def test_records_whose_key_contradicts_them_or_that_name_the_impossible_are_refused() -> None:
    assert records.problem("f.0", instance()) is None
    assert records.problem("g.0", instance()) is not None  # stored under another function's key
    assert records.problem("f.1", instance()) is not None
    assert records.problem("f.-1", instance(slot=-1)) is not None
    assert records.problem("f.0", instance(version=0)) is not None
    assert records.problem("f.0", instance(address="evil")) is not None
    assert records.problem("F_.0", instance(function="F_")) is not None
    assert records.problem("f", function()) is None
    assert records.problem("g", function()) is not None
    assert records.problem("f", function(tenant="Not A Tenant")) is not None
    assert records.problem("f", function(tenant="")) is None  # the operator's
    lease = ProxyLease(proxy_id="p-1", started_at=0, renewed_at=0)
    assert records.problem("p-1", lease) is None
    assert records.problem("p-2", lease) is not None


def test_scale_intents_under_another_key_by_an_impossible_proxy_or_holding_too_long_are_refused() -> None:
    intent = ScaleIntent(function="f", proxy_id="proxy-0-12", asked_at=100.0, expires_at=102.0)
    assert records.problem("f", intent) is None
    assert records.problem("g", intent) is not None
    assert records.problem("scale-intent.f", intent) is not None  # the old leases-bucket key is no intent's key
    assert records.problem("F_", msgspec.structs.replace(intent, function="F_")) is not None
    assert records.problem("f", msgspec.structs.replace(intent, proxy_id="a b")) is not None
    assert records.problem("f", msgspec.structs.replace(intent, expires_at=99.0)) is not None  # ends before it began
    longest = msgspec.structs.replace(intent, expires_at=100.0 + names.SCALE_INTENT_MAX_AGE)
    assert records.problem("f", longest) is None
    assert records.problem("f", msgspec.structs.replace(longest, expires_at=longest.expires_at + 1)) is not None
    assert records.problem("f", msgspec.structs.replace(intent, expires_at=float("nan"))) is not None
    assert records.problem("f", msgspec.structs.replace(intent, expires_at=float("inf"))) is not None
    assert records.read("f", msgspec.json.encode(intent), ScaleIntent) == intent
    assert records.read("f", b'{"function": "f", "proxy_id": "p"}', ScaleIntent) is None


def test_read_skips_what_does_not_decode() -> None:
    assert records.read("f.0", b"{", InstanceRecord) is None
    assert records.read("f.0", b'{"function": 1}', InstanceRecord) is None
    assert records.read("f.0", msgspec.json.encode(instance()), InstanceRecord) == instance()
