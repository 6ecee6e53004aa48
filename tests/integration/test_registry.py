"""The registry's compare-and-set against a real nats-server: a lost race is a result, never an exception."""

from __future__ import annotations

from contextlib import aclosing
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from aube.shared import kvread, names
from aube.shared.natsserver import LocalNatsServer
from aube.shared.registry import Registry
from aube.shared.schemas import InstanceRecord, ProxyLease

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]


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


async def test_snapshots_are_complete_and_leave_no_consumer_behind(nats_server: LocalNatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        registry = await Registry.open(js)
        revisions = [await registry.create_instance(record(function=f"f{i}", slot=0)) for i in range(40)]
        assert all(revisions)
        await registry.delete_instance("f7.0")

        raw = await kvread.snapshot(js, names.BUCKET_INSTANCES)
        assert len(raw) == 40 and [e.key for e in raw if e.value is None] == ["f7.0"]  # deletions are reported
        for _ in range(30):
            got = sorted(e.record.function for e in await registry.instances())
            assert got == sorted(f"f{i}" for i in range(40) if i != 7)
        assert [e.key for e in await registry.instances("f3")] == ["f3.0"]

        # nats-py's kv.watch leaves its consumer for 5 minutes; snapshots every second would pile them up until
        # the server refuses new consumers.
        info = await js.stream_info(kvread.stream_name(names.BUCKET_INSTANCES))
        assert info.state.consumer_count == 0
    finally:
        await nc.close()


async def test_a_follow_is_caught_up_only_after_every_existing_entry(nats_server: LocalNatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        registry = await Registry.open(js)

        async def until_caught_up() -> dict[str, InstanceRecord | None]:
            seen: dict[str, InstanceRecord | None] = {}
            async with aclosing(registry.watch_instances()) as changes:
                async for change in changes:
                    if change is None:
                        return seen
                    seen[change.key] = change.record
            raise AssertionError("the follow ended")

        assert await until_caught_up() == {}  # an empty bucket is caught up at once
        for i in range(60):
            await registry.create_instance(record(function=f"f{i}", slot=0))
        # The stream's last message is a deletion: it must still count as seen.
        await registry.delete_instance("f59.0")
        for _ in range(20):
            seen = await until_caught_up()
            assert len(seen) == 60 and seen["f59.0"] is None and seen["f0.0"] is not None

        # After the marker, changes keep coming.
        keys: list[str] = []
        async with aclosing(registry.watch_instances()) as changes:
            async for change in changes:
                if change is None:
                    await registry.create_instance(record(function="late", slot=0))
                else:
                    keys.append(change.key)
                    if change.key == "late.0":
                        break
        assert keys[-1] == "late.0" and len(keys) == 61
    finally:
        await nc.close()


async def test_an_unreadable_instance_record_does_not_end_a_follow(nats_server: LocalNatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        registry = await Registry.open(nc.jetstream())
        await registry.create_instance(record(function="good", slot=0))
        await registry.instances_kv.put("broken.0", b'{"from": "a newer writer"}')
        await registry.instances_kv.put("garbage.0", b"\xff not json")
        seen: list[str] = []
        async with aclosing(registry.watch_instances()) as changes:
            async for change in changes:
                if change is None:
                    await registry.create_instance(record(function="after", slot=0))
                    continue
                seen.append(change.key)
                if change.key == "after.0":
                    break
        assert seen == ["good.0", "after.0"]
    finally:
        await nc.close()


async def test_a_follow_whose_consumer_is_lost_recovers_within_seconds(nats_server: LocalNatsServer) -> None:
    """A follow's consumer lives on one server; when that server is lost (the rig's partitioned JetStream leader)
    the follower hears nothing until nats-py recreates the consumer after two missed heartbeats. With `kv.watch()`'s
    5 s heartbeat a proxy's view stayed stale for 10-20 s after the rig's faults (404 for a function just deployed).
    The loss is made here by deleting the consumer on the server: the next change must arrive within 5 s."""
    import anyio

    nc = await nats.connect(nats_server.url)
    try:
        registry = await Registry.open(nc.jetstream())
        js = nc.jetstream()
        stream = kvread.stream_name(names.BUCKET_INSTANCES)
        await registry.create_instance(record(function="before", slot=0))
        async with aclosing(registry.watch_instances()) as changes:
            async for change in changes:
                if change is None:
                    break
            for info in await js.consumers_info(stream):
                assert info.name is not None
                await js.delete_consumer(stream, info.name)
            await registry.create_instance(record(function="after", slot=0))
            started = anyio.current_time()
            with anyio.fail_after(5):
                async for change in changes:
                    if change is not None and change.key == "after.0":
                        break
            print(f"the change arrived {anyio.current_time() - started:.1f}s after the consumer was lost")
    finally:
        await nc.close()


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_malformed_and_forged_entries_are_skipped_never_trusted_never_a_crash(platform) -> None:  # type: ignore[no-untyped-def]
    """Finding 3: a malformed registry entry crashed the control plane at start. Entries that do not decode, sit under
    a key their contents contradict, or name an impossible address are logged and skipped by every reader."""
    from support import zip_base64

    from aube.shared.bus import request
    from aube.shared.schemas import FunctionRecord, ListReply, ListRequest, Manifest, UploadReply, UploadRequest

    nc = await nats.connect(platform.nats_url)
    try:
        registry = await Registry.open(nc.jetstream())
        manifest = Manifest()
        good = FunctionRecord(
            name="ok", version=1, manifest=manifest, artifact="x", runtime="process", created_at=0, updated_at=0
        )
        await registry.instances_kv.put("broken.0", b"{not json")
        await registry.instances_kv.put("victim.0", msgspec.json.encode(record(function="other", slot=3)))
        await registry.instances_kv.put("evil.0", msgspec.json.encode(record(function="evil", address="x:99999")))
        await registry.functions_kv.put("garbage", b"\x00\xff")
        await registry.functions_kv.put("victim", msgspec.json.encode(msgspec.structs.replace(good, name="attacker")))
        await registry.leases_kv.put("p1", b"[]")
        assert await registry.instances() == [] and await registry.functions() == [] and await registry.leases() == []
        assert await registry.get_instance("victim.0") is None and await registry.get_function("victim") is None

        cp = await platform.start_controlplane()  # before the fix: a crash at start, on the first record
        body = UploadRequest(name="rev", zip=zip_base64(REPO / "examples" / "reverse-async"))
        assert (await request(nc, names.SUBJECT_UPLOAD, body, UploadReply, 300)).version == 1
        listed = await request(nc, names.SUBJECT_LIST, ListRequest(), ListReply, 10)
        assert [f.name for f in listed.functions] == ["rev"]
        assert cp.proc is not None and cp.proc.poll() is None
        assert "untrustworthy" in cp.log_text() or "unreadable" in cp.log_text()
    finally:
        await nc.close()


async def test_a_snapshot_shows_each_key_once_in_its_latest_state_when_it_changes_meanwhile(
    nats_server: LocalNatsServer,
) -> None:
    """A key written after the snapshot has read it is delivered again (the consumer goes on with new messages): the
    snapshot must show it once, as it is now. Seen as an instance counted twice (starting and free) in the min_free
    keeper's tests (tests/controlplane/)."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        kv = await js.create_key_value(bucket="snapshot-race", history=1)
        keys = [f"k{i:03}" for i in range(kvread.SNAPSHOT_BATCH + 10)]  # read in two fetches
        for key in keys:
            await kv.put(key, b"before")

        class WritesAfterTheFirstFetch:
            """The JetStream context, but two keys already read change before the snapshot's next fetch."""

            def __getattr__(self, name: str) -> Any:
                return getattr(js, name)

            async def pull_subscribe_bind(self, *args: Any, **kwargs: Any) -> Any:
                sub = await js.pull_subscribe_bind(*args, **kwargs)
                first_fetch = sub.fetch

                async def fetch(*args: Any, **kwargs: Any) -> Any:
                    batch = await first_fetch(*args, **kwargs)
                    if sub.fetch is fetch:
                        sub.fetch = first_fetch
                        await kv.put(keys[0], b"after")
                        await kv.delete(keys[1])
                    return batch

                sub.fetch = fetch
                return sub

        raw = await kvread.snapshot(WritesAfterTheFirstFetch(), "snapshot-race")  # type: ignore[arg-type]

        assert len(raw) == len(keys) and len({e.key for e in raw}) == len(keys)
        latest = {e.key: e.value for e in raw}
        assert latest[keys[0]] == b"after" and latest[keys[1]] is None and latest[keys[2]] == b"before"
    finally:
        await nc.close()
