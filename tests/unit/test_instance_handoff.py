"""The handoff offer's wire and its credential check (aube.instance.handoff), without sockets."""

from __future__ import annotations

import hashlib

from aube.instance.handoff_wire import HEADER, MAX_PREFIX, Offer, authentic, encode_offer, parse_offer

SECRET = "s3cret"
DIGEST = hashlib.sha256(SECRET.encode()).hexdigest()


def test_an_offer_round_trips() -> None:
    wire = encode_offer(SECRET, b"GET / HTTP/1.1\r\n\r\nrest", 1.5, None, 20.0)
    assert parse_offer(wire) == Offer(SECRET, b"GET / HTTP/1.1\r\n\r\nrest", 1.5, None, 20.0)


def test_an_offer_carries_the_ping_bound_and_an_older_proxys_offer_has_none() -> None:
    wire = encode_offer(SECRET, b"head", None, None, 20.0, 2.5)
    assert parse_offer(wire) == Offer(SECRET, b"head", None, None, 20.0, 2.5)
    older = b'{"secret": "s3cret", "idle_timeout": null, "max_duration": null, "ack_wait": 20.0}'
    assert parse_offer(HEADER.pack(len(older), 0) + older) == Offer(SECRET, b"", None, None, 20.0, None)
    bad_bound = b'{"secret": "s3cret", "ack_wait": 1, "ping_bound": "2"}'
    assert parse_offer(HEADER.pack(len(bad_bound), 0) + bad_bound) is None


def test_truncated_oversized_or_malformed_offers_are_none() -> None:
    wire = encode_offer(SECRET, b"head", None, None, 1.0)
    assert parse_offer(wire[:-1]) is None
    assert parse_offer(wire + b"x") is None
    assert parse_offer(b"\x00") is None
    assert parse_offer(HEADER.pack(2, 0) + b"{}") is None  # no secret
    assert parse_offer(HEADER.pack(4, 0) + b"nope") is None
    assert parse_offer(HEADER.pack(2, MAX_PREFIX + 1) + b"{}") is None
    bad_type = b'{"secret": 1, "ack_wait": 1}'
    assert parse_offer(HEADER.pack(len(bad_type), 0) + bad_type) is None


def test_only_the_instance_credential_authenticates_and_none_without_one() -> None:
    offer = parse_offer(encode_offer(SECRET, b"", None, None, 1.0))
    assert offer is not None
    assert authentic(offer, DIGEST)
    assert not authentic(parse_offer(encode_offer("other", b"", None, None, 1.0)), DIGEST)  # type: ignore[arg-type]
    assert not authentic(offer, "")  # an instance without a configured credential takes no handoff
