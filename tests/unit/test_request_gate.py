"""The control plane's bound on a tenant's requests in flight (services/controlplane/service.py RequestGate)."""

from __future__ import annotations

from aube.controlplane.service import RequestGate
from aube.shared import tenants as tenancy


def test_a_tenant_at_its_limit_is_refused_until_one_request_ends_and_others_are_not_counted() -> None:
    gate = RequestGate(2)
    assert gate.enter("alice") and gate.enter("alice")
    assert not gate.enter("alice")
    assert gate.enter("bob")  # alice's limit is hers alone
    assert all(gate.enter(tenancy.OPERATOR) for _ in range(10))  # the operator is not counted
    gate.leave("alice")
    assert gate.enter("alice")
    for tenant in ("alice", "alice", "bob", *[tenancy.OPERATOR] * 10):
        gate.leave(tenant)
    assert gate.in_flight == {}  # nothing kept for tenants with nothing in flight


def test_a_limit_below_one_still_lets_one_request_through() -> None:
    gate = RequestGate(0)
    assert gate.enter("alice") and not gate.enter("alice")
