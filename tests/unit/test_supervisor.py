from __future__ import annotations

import itertools

from aube.cli.supervisor import FIRST_DELAY, MAX_DELAY, restart_delay


def test_restart_delays_grow_and_are_capped() -> None:
    delays = [restart_delay(n) for n in range(1, 12)]
    assert delays[0] == FIRST_DELAY
    assert all(b >= a for a, b in itertools.pairwise(delays))
    assert delays[-1] == MAX_DELAY
