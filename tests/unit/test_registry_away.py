"""A registry error inside a task group reaches the control plane's request handler as an ExceptionGroup; it must
still be answered `unavailable` (retry shortly), not `internal` (the rig saw an upload during a NATS election fail
with "internal error: ExceptionGroup")."""

from __future__ import annotations

from nats.errors import TimeoutError as NatsTimeoutError

from aube.controlplane.service import _registry_away


def test_a_plain_registry_timeout_is_away() -> None:
    e = NatsTimeoutError()
    assert _registry_away(e) is e


def test_a_group_of_registry_errors_is_away_even_nested() -> None:
    inner = TimeoutError()
    group = ExceptionGroup("tg", [ExceptionGroup("inner", [inner]), NatsTimeoutError()])
    assert _registry_away(group) is inner


def test_a_group_with_any_other_error_is_a_bug() -> None:
    assert _registry_away(ExceptionGroup("tg", [TimeoutError(), ValueError("bug")])) is None
    assert _registry_away(ValueError("bug")) is None
