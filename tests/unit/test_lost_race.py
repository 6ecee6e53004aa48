"""A compare-and-set that lost its race is an outcome, not an error, whichever code JetStream answers with."""

from __future__ import annotations

import pytest
from nats.js.errors import BadRequestError, KeyWrongLastSequenceError, ServiceUnavailableError

from aube.shared.registry import lost_race


@pytest.mark.parametrize("code", [10071, 10164])  # a single server's, a clustered stream leader's
def test_wrong_last_sequence_is_a_lost_race(code: int) -> None:
    assert lost_race(BadRequestError(code=400, err_code=code, description="wrong last sequence"))


def test_other_errors_are_not() -> None:
    assert lost_race(KeyWrongLastSequenceError(description="wrong last sequence: 5"))
    assert not lost_race(BadRequestError(code=400, err_code=10058, description="stream name in use"))
    assert not lost_race(ServiceUnavailableError(code=503, err_code=10008, description="unavailable"))
