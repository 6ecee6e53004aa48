"""The registry's compare-and-set against a real nats-server: a lost race is a result, never an exception."""

from __future__ import annotations

import msgspec
import nats
import pytest

from aube.shared.natsserver import LocalNatsServer
from aube.shared.registry import Registry
from aube.shared.schemas import InstanceRecord, ProxyLease

pytestmark = pytest.mark.anyio


def record(**kw: object) -> InstanceRecord:
    base: dict[str, object] = dict(
        function="f", slot=0, instance_id="i0", version=1, state="free", runtime="process", owner="o"
    )
    base.update(kw)
    return msgspec.convert(base, InstanceRecord)


async def test_slots_updates_and_deletes_are_compare_and_set(nats_server: LocalNatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        registry = await Registry.open(nc.jetstream())
        first = await registry.create_instance(record())
        assert first is not None
        assert await registry.create_instance(record(instance_id="other")) is None  # the slot is taken

        busy = await registry.update_instance(first, record(state="busy", claimed_by="p1"))
        assert busy is not None
        assert await registry.update_instance(first, record(state="busy", claimed_by="p2")) is None  # stale

        # A delete at a stale revision loses too, and leaves the entry as it is.
        assert await registry.delete_instance("f.0", first) is False
        entry = await registry.get_instance("f.0")
        assert entry is not None
        assert entry.record.claimed_by == "p1"
        assert await registry.delete_instance("f.0", busy) is True
        assert await registry.get_instance("f.0") is None
        assert await registry.create_instance(record(instance_id="reborn")) is not None  # a deleted slot is free

        lease = ProxyLease(proxy_id="p1", started_at=0, renewed_at=0)
        stale = await registry.put_lease(lease)
        await registry.put_lease(msgspec.structs.replace(lease, renewed_at=1))
        assert await registry.delete_lease("p1", stale) is False
        assert [entry.record.renewed_at for entry in await registry.leases()] == [1]
    finally:
        await nc.close()


def test_local_nats_server_moves_to_new_ports_when_its_port_was_taken() -> None:
    import socket

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    try:
        server = LocalNatsServer()
        server.port = squatter.getsockname()[1]  # taken between choosing it and the bind, as by a neighbour
        with server:
            assert server.port != squatter.getsockname()[1]
    finally:
        squatter.close()
