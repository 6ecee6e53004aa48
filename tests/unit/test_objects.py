"""The object reader's pure decisions: which claims of an object's meta are acceptable before anything is read."""

from __future__ import annotations

import pytest

from aube.controlplane.objects import ObjectMeta, _Link, _Options, check_meta, max_chunks, meta_subject
from aube.shared.errors import AubeError

MIB = 1024 * 1024


def meta(**fields: object) -> ObjectMeta:
    base: dict[str, object] = {"name": "k", "nuid": "Abc123XYZ", "size": 1000, "chunks": 1}
    base.update(fields)
    return ObjectMeta(**base)  # type: ignore[arg-type]


def test_an_honest_meta_gives_its_nuid() -> None:
    assert check_meta(meta(), "k", MIB) == "Abc123XYZ"
    assert check_meta(meta(size=MIB, chunks=max_chunks(MIB)), "k", MIB) == "Abc123XYZ"


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"size": MIB + 1}, "bundle_too_large"),
        ({"chunks": max_chunks(MIB) + 1}, "bundle_too_large"),
        ({"nuid": ">"}, "bundle_corrupt"),
        ({"nuid": "*"}, "bundle_corrupt"),
        ({"nuid": "a.b"}, "bundle_corrupt"),
        ({"nuid": ""}, "bundle_corrupt"),
        ({"deleted": True}, "invalid_request"),
        ({"options": _Options(link=_Link(bucket="another-tenant", name="secret"))}, "invalid_request"),
    ],
)
def test_claims_that_are_refused_before_reading(fields: dict[str, object], code: str) -> None:
    with pytest.raises(AubeError) as caught:
        check_meta(meta(**fields), "k", MIB)
    assert caught.value.code == code


def test_chunk_allowance_and_meta_subject() -> None:
    assert max_chunks(64 * MIB) == 64 * MIB // 8192 + 64  # 8256: nats clients write 512 chunks of 128 KiB
    assert meta_subject("aube-bundles", "my/key") == "$O.aube-bundles.M.bXkva2V5"
