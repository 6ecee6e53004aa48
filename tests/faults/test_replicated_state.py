"""Replicated state on a real 3-node NATS cluster: local nats-server processes on loopback, each on the real
deploy/nats.conf accounts under deploy/cluster/node.conf (natscluster.LocalNatsCluster), nodes killed with SIGKILL
and paused with SIGSTOP. Clients log in as the platform's own services.

Writes go through `Registry.apply` (the one compare-and-set loop) with a JetStream timeout of 2 s; each write adds
one to the entry's `streams_served`, so the entry itself counts the writes that landed: every acknowledged one
(`Written`) must be there, and nothing else except writes whose outcome `apply` reported `Unknown`.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from support import AccountsServer, accounts_cluster, free_port, wait_http

from aube.shared import buckets, names, natsconn
from aube.shared.natscluster import LocalNatsCluster
from aube.shared.registry import REGISTRY_ERRORS, Applied, Registry, Unknown, Written
from aube.shared.schemas import InstanceRecord

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

KEY = "f.0"
INSTANCES = buckets.kv_stream(names.BUCKET_INSTANCES)
STREAMS = [
    INSTANCES,
    buckets.kv_stream(names.BUCKET_FUNCTIONS),
    buckets.kv_stream(names.BUCKET_LEASES),
    buckets.kv_stream(names.BUCKET_SCALE_INTENTS),
    buckets.object_stream(names.BUCKET_BUNDLES),
]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[AccountsServer]:
    with accounts_cluster(tmp_path / "data") as c:
        yield c


def nodes(server: AccountsServer) -> LocalNatsCluster:
    assert isinstance(server.server, LocalNatsCluster)
    return server.server


@asynccontextmanager
async def service_client(
    server: AccountsServer, service: str, url: str | None = None, **options: object
) -> AsyncIterator[NATS]:
    """A connection as the platform service `service` (natsconn's defaults: the services' own)."""
    login = server.secrets.service_login(service)
    nc = await natsconn.connect(
        url or server.url, user=login.user, password=login.password, name=f"test-{service}", **options
    )
    try:
        yield nc
    finally:
        await nc.close()


def record(**kw: object) -> InstanceRecord:
    base: dict[str, object] = dict(
        function="f", slot=0, instance_id="i0", version=1, state="free", runtime="process", owner="o", address="a:1"
    )
    return msgspec.convert({**base, **kw}, InstanceRecord)


def bump(rec: InstanceRecord) -> InstanceRecord:
    return msgspec.structs.replace(rec, streams_served=rec.streams_served + 1)


async def raw_config(nc: NATS, stream: str) -> dict[str, object]:
    """The stream's configuration as the server reports it (every field, also those nats-py may not know)."""
    reply = json.loads((await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=5)).data)
    config: dict[str, object] = reply["config"]
    return config


async def wait_replicated(js: JetStreamContext, stream: str, replicas: int, timeout: float = 20) -> str:
    """Until `stream` has a leader and `replicas - 1` current followers; the leader's name."""
    with anyio.fail_after(timeout):
        while True:
            info = await js.stream_info(stream)
            peers = (info.cluster.replicas or []) if info.cluster else []
            if info.cluster and info.cluster.leader and len([p for p in peers if p.current]) == replicas - 1:
                return info.cluster.leader
            await anyio.sleep(0.1)


class Writes:
    """`apply` over and over on one entry, each outcome with the moment it was asked for and the moment it came.
    Ended by `stop` (never by cancelling: a write cancelled in flight may land with no outcome to count)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.outcomes: list[tuple[float, float, Applied | Exception]] = []
        self.until = float("inf")

    def stop(self) -> None:
        self.until = 0.0

    async def run(self, until: float) -> None:
        self.until = until
        while time.monotonic() < self.until:
            asked = time.monotonic()
            outcome: Applied | Exception
            try:
                outcome = await self.registry.apply(KEY, bump)
            except REGISTRY_ERRORS as e:  # the read before any write failed: nothing was written
                outcome = e
            self.outcomes.append((asked, time.monotonic(), outcome))
            if not isinstance(outcome, Written):
                await anyio.sleep(0.05)

    def written(self, after: float = 0.0) -> list[tuple[float, float, Applied | Exception]]:
        return [o for o in self.outcomes if isinstance(o[2], Written) and o[0] >= after]

    def unknown(self) -> int:
        return sum(isinstance(o[2], Unknown) for o in self.outcomes)

    def not_written(self) -> list[tuple[float, float, str]]:
        """Every other outcome, for a failure's message: when asked and answered (from the first), and why."""
        start = self.outcomes[0][0] if self.outcomes else 0.0
        return [
            (round(asked - start, 2), round(came - start, 2), f"{type(o).__name__}: {getattr(o, 'why', o)}")
            for asked, came, o in self.outcomes
            if not isinstance(o, Written)
        ]

    async def check_counted(self) -> int:
        """Every acknowledged write is in the entry, and nothing but them and the unknown ones."""
        with anyio.fail_after(20):
            while True:
                try:
                    entry = await self.registry.get_instance(KEY)
                    break
                except REGISTRY_ERRORS:
                    await anyio.sleep(0.2)
        assert entry is not None
        landed, acked = entry.record.streams_served, len(self.written())
        assert acked <= landed <= acked + self.unknown(), (acked, landed, self.unknown(), self.not_written())
        return landed


@pytest.mark.slow
@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_a_platform_on_a_cluster_creates_every_bucket_with_its_replica_count(
    cluster: AccountsServer,
    platform_on,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    """AUBE_KV_REPLICAS=3 on the control plane: every bucket is created with 3 replicas. The proxy and the reaper
    (whose users may create these streams but not update them) keep their default setting, 1, and run on them."""
    platform = platform_on(cluster.url)  # every node's URL: services take the list
    await platform.start_controlplane(**cluster.service_env("controlplane"), AUBE_KV_REPLICAS="3")
    reaper = platform.start("aube.reaper", **cluster.service_env("reaper"))
    port = free_port()
    platform.start(
        "aube.proxy", **cluster.service_env("proxy"), AUBE_PROXY_PORT=str(port), AUBE_PROXY_HOST="127.0.0.1",
        AUBE_OPERATOR_PORT="off",
    )  # fmt: skip
    await wait_http(port)
    async with service_client(cluster, "controlplane") as nc:
        for stream in STREAMS:
            assert (await nc.jetstream().stream_info(stream)).config.num_replicas == 3, stream
    with anyio.fail_after(30):
        while "running (every" not in reaper.log_text():
            assert reaper.proc is not None and reaper.proc.poll() is None, reaper.log_text()[-3000:]
            await anyio.sleep(0.2)


async def test_an_existing_single_replica_registry_is_replicated_in_place(cluster: AccountsServer) -> None:
    """Buckets made with one replica (a platform from before, or started without the setting) become R3 by a
    stream update: entries, revisions and every other setting kept; the copies are real (the leader's node is
    killed and the entries are read from the others)."""
    async with service_client(cluster, "controlplane") as nc:
        js = nc.jetstream(timeout=10)
        single = await Registry.open(js)
        revision = await single.create_instance(record())
        assert revision is not None
        store = await buckets.open_object_store(js, names.BUCKET_BUNDLES, replicas=1, resize=buckets.Resize.EXACT)
        await store.put("bundle", b"x" * 300_000)
        before = {stream: await raw_config(nc, stream) for stream in STREAMS}
        assert all(config["num_replicas"] == 1 for config in before.values())

        await Registry.open(js, replicas=3, resize=buckets.Resize.EXACT)
        await buckets.open_object_store(js, names.BUCKET_BUNDLES, replicas=3, resize=buckets.Resize.EXACT)
        for stream in STREAMS:
            after = await raw_config(nc, stream)
            assert after == {**before[stream], "num_replicas": 3}, stream  # history, max_age... kept
        intents = await raw_config(nc, buckets.kv_stream(names.BUCKET_SCALE_INTENTS))
        assert intents["max_age"] == int(names.SCALE_INTENT_MAX_AGE * 1e9) and intents["max_msgs_per_subject"] == 1
        leader = await wait_replicated(js, INSTANCES, 3)
        await wait_replicated(js, buckets.object_stream(names.BUCKET_BUNDLES), 3)
    async with service_client(cluster, "proxy") as nc:
        registry = await Registry.open(nc.jetstream(timeout=2))
        nodes(cluster).kill(nodes(cluster).index_of(leader))
        with anyio.fail_after(30):
            while True:
                try:
                    entry = await registry.get_instance(KEY)
                    break
                except REGISTRY_ERRORS:  # until a new leader is elected
                    await anyio.sleep(0.2)
        assert entry is not None and entry.revision == revision and entry.record == record()
    async with service_client(cluster, "controlplane") as nc:
        with anyio.fail_after(30):
            while True:
                try:  # the bundle store may have lost its leader too
                    store = await nc.jetstream(timeout=5).object_store(names.BUCKET_BUNDLES)
                    assert (await store.get("bundle")).data == b"x" * 300_000
                    break
                except REGISTRY_ERRORS:
                    await anyio.sleep(0.2)


async def replicated_registry(server: AccountsServer) -> str:
    """Make the registry R3 as the control plane does; the name of the instances bucket's leader."""
    async with service_client(server, "controlplane") as nc:
        js = nc.jetstream(timeout=10)  # creating streams on a cluster just started, on a loaded machine, can be slow
        registry = await Registry.open(js, replicas=3, resize=buckets.Resize.EXACT)
        assert await registry.create_instance(record()) is not None
        return await wait_replicated(js, INSTANCES, 3)


async def test_with_one_node_killed_compare_and_set_writes_go_on_through_the_other_two(
    cluster: AccountsServer,
) -> None:
    """The worst single loss: the node that is both the instances bucket's leader and the client's server. The
    client, given all three servers, moves to a live one; writes resume; no acknowledged write is lost."""
    leader = nodes(cluster).index_of(await replicated_registry(cluster))
    ordered = [nodes(cluster).nodes[leader].url] + [n.url for i, n in enumerate(nodes(cluster).nodes) if i != leader]
    async with service_client(cluster, "proxy", ",".join(ordered), dont_randomize=True) as nc:
        assert nc.connected_url is not None and nc.connected_url.port == nodes(cluster).nodes[leader].port
        writes = Writes(await Registry.open(nc.jetstream(timeout=2)))
        async with anyio.create_task_group() as tg:
            tg.start_soon(writes.run, time.monotonic() + 20)
            await anyio.sleep(1.5)
            killed = time.monotonic()
            nodes(cluster).kill(leader)
            with anyio.fail_after(15):
                while not writes.written(after=killed):
                    await anyio.sleep(0.05)
            resumed = writes.written(after=killed)[0][1] - killed
            await anyio.sleep(1.0)
            writes.stop()
        assert nc.is_connected and nc.connected_url is not None
        assert nc.connected_url.port in {n.port for i, n in enumerate(nodes(cluster).nodes) if i != leader}
        landed = await writes.check_counted()
    before = len(writes.written()) - len(writes.written(after=killed))
    print(f"leader and client's node killed: writes resumed after {resumed:.2f} s; {before} writes before the kill,")
    print(f"{landed} landed in all, {writes.unknown()} of unknown outcome")
    assert before > 10  # the writes did run before the kill


async def test_losing_two_of_three_refuses_every_write_until_one_returns(cluster: AccountsServer) -> None:
    """No quorum, no write (no split brain); writes resume once a second node is back."""
    await replicated_registry(cluster)
    first = nodes(cluster).nodes[0].url
    async with service_client(cluster, "proxy", first) as nc:  # on the node that stays
        writes = Writes(await Registry.open(nc.jetstream(timeout=2)))
        async with anyio.create_task_group() as tg:
            tg.start_soon(writes.run, time.monotonic() + 40)
            await anyio.sleep(1.0)
            lost = time.monotonic()
            nodes(cluster).kill(1)
            nodes(cluster).kill(2)
            await anyio.sleep(8.0)
            back = time.monotonic()
            # Outcomes that came while only one node was up (a write takes up to 2 s, its re-read 2 s more).
            during = [o for o in writes.outcomes if lost + 0.5 <= o[1] <= back]
            assert during and not any(isinstance(o[2], Written) for o in during), during
            refused = len(during)
            nodes(cluster).restart(1)
            with anyio.fail_after(20):
                while not writes.written(after=back):
                    await anyio.sleep(0.05)
            resumed = writes.written(after=back)[0][1] - back
            writes.stop()
        landed = await writes.check_counted()
    print(f"2 of 3 lost for {back - lost:.1f} s: {refused} writes failed, none acknowledged; writes resumed")
    print(f"{resumed:.2f} s after the restart began; {landed} landed, {writes.unknown()} of unknown outcome")


async def test_a_client_given_one_server_moves_to_a_discovered_one_with_its_login(cluster: AccountsServer) -> None:
    """Credentials are connect options, not URL parts (natsconn): a server learnt from the cluster's gossip gets
    them too. (With them in the URL, nats-py sends them to that URL's server only, and the reconnect fails.)"""
    await replicated_registry(cluster)
    async with service_client(cluster, "reaper", nodes(cluster).nodes[0].url) as nc:
        assert len(nc.discovered_servers) >= 2  # learnt from the server it connected to
        registry = await Registry.open(nc.jetstream(timeout=2), scale_intents=False)
        nodes(cluster).kill(0)
        killed = time.monotonic()
        with anyio.fail_after(20):
            while True:
                try:
                    await registry.get_instance(KEY)
                    break
                except REGISTRY_ERRORS:
                    await anyio.sleep(0.1)
        assert nc.connected_url is not None and nc.connected_url.port != nodes(cluster).nodes[0].port
        print(f"moved to a discovered server and read the registry {time.monotonic() - killed:.2f} s after the kill")


# nats-py leaves unclosed the connection of a reconnect attempt that timed out (the paused node's kernel accepted
# it, the node never sent its INFO); collected later, it is an "unraisable" ResourceWarning. It is collected here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_client_of_a_hung_node_moves_to_a_live_one_within_seconds(cluster: AccountsServer) -> None:
    """A paused node keeps its connections open: only pings tell. natsconn's 2 s pings (3 outstanding at most) find
    it in seconds; nats-py's default (120 s) left a client of a hung node with nothing done for 40 s and more."""
    leader = nodes(cluster).index_of(await replicated_registry(cluster))
    other = (leader + 1) % 3  # the client's node, not the bucket's leader: only the client is stuck
    async with service_client(cluster, "proxy", nodes(cluster).nodes[other].url) as nc:
        writes = Writes(await Registry.open(nc.jetstream(timeout=2)))
        async with anyio.create_task_group() as tg:
            tg.start_soon(writes.run, time.monotonic() + 40)
            await anyio.sleep(1.0)
            paused = time.monotonic()
            nodes(cluster).pause(other)
            try:
                with anyio.fail_after(25):
                    while not writes.written(after=paused + 0.5):
                        await anyio.sleep(0.05)
            finally:
                nodes(cluster).resume(other)
            resumed = writes.written(after=paused + 0.5)[0][1] - paused
            writes.stop()
        assert nc.connected_url is not None and nc.connected_url.port != nodes(cluster).nodes[other].port
        await writes.check_counted()
    gc.collect()
    print(f"client's node paused: writes resumed through another node after {resumed:.2f} s")


async def test_a_deployers_cli_raises_its_bundle_store_and_never_lowers_it(cluster: AccountsServer) -> None:
    """The bundle store in a tenant's own account is the CLI's (`aube deploy` creates it for large uploads): a
    deployer asking for 3 replicas raises a 1-replica store; one whose setting is unset (1) leaves a 3 alone."""
    from aube.cli.main import bundle_store

    stream = buckets.object_stream(names.BUCKET_BUNDLES)
    deployer = cluster.login("deployer")
    nc = await natsconn.connect(cluster.url, user=deployer.user, password=deployer.password, name="test-cli")
    try:
        js = nc.jetstream(timeout=5)
        await bundle_store(nc, 1)
        assert (await js.stream_info(stream)).config.num_replicas == 1
        store = await bundle_store(nc, 3)
        assert (await js.stream_info(stream)).config.num_replicas == 3
        await bundle_store(nc, 1)
        assert (await js.stream_info(stream)).config.num_replicas == 3
        await store.put("bundle", b"y" * 1000)  # usable as it is
    finally:
        await nc.close()


async def test_a_bundle_put_through_one_node_is_read_whole_through_another(
    cluster: AccountsServer, tmp_path: Path
) -> None:
    """The control plane reads a bundle the moment the upload request names it, maybe through another node than the
    put's. With direct gets (which followers answer), such reads found bundles missing or short (23 of 150 once); the
    leader's message gets see every acknowledged put."""
    from aube.controlplane.objects import fetch_object

    login = cluster.secrets.service_login("controlplane")
    urls = [node.url for node in nodes(cluster).nodes]
    writer = await natsconn.connect(urls[0], user=login.user, password=login.password, name="test-writer")
    readers = [
        await natsconn.connect(u, user=login.user, password=login.password, name="test-reader") for u in urls[1:]
    ]
    try:
        js = writer.jetstream(timeout=10)
        store = await buckets.open_object_store(js, names.BUCKET_BUNDLES, replicas=3, resize=buckets.Resize.EXACT)
        for i in range(150):
            bundle = bytes([i % 256]) * 300_000  # three chunks
            await store.put(f"b{i}", bundle)
            dest = tmp_path / f"b{i}"
            got = await fetch_object(readers[i % 2].jetstream(timeout=5), names.BUCKET_BUNDLES, f"b{i}", dest, 1 << 20)
            assert got.size == len(bundle) and dest.read_bytes() == bundle
    finally:
        for nc in [writer, *readers]:
            await nc.close()


async def test_a_snapshot_taken_through_another_node_holds_the_write_just_acknowledged(cluster: AccountsServer) -> None:
    """The registry's snapshots (kvread) read through a new consumer, which may live on another server than the
    client's (its first fetch then met "no responders": 17 of 300) or on a replica behind its leader (the snapshot
    missed the write just acknowledged: 1 of 300)."""
    from aube.shared import kvread

    login = cluster.secrets.service_login("controlplane")
    urls = [node.url for node in nodes(cluster).nodes]
    writer = await natsconn.connect(urls[0], user=login.user, password=login.password, name="test-writer")
    readers = [
        await natsconn.connect(u, user=login.user, password=login.password, name="test-reader") for u in urls[1:]
    ]
    try:
        bucket = names.BUCKET_FUNCTIONS
        kv = await buckets.open_kv(writer.jetstream(timeout=10), bucket, replicas=3, resize=buckets.Resize.EXACT)
        for i in range(300):
            revision = await kv.put(f"f{i % 20}", str(i).encode())
            entries = await kvread.snapshot(readers[i % 2].jetstream(timeout=5), bucket)
            assert any(e.key == f"f{i % 20}" and e.revision == revision for e in entries), i
    finally:
        for nc in [writer, *readers]:
            await nc.close()


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_a_request_that_meets_a_registry_without_quorum_is_answered_unavailable(
    cluster: AccountsServer,
    platform_on,  # type: ignore[no-untyped-def]
) -> None:
    """The control plane answers `unavailable` ("retry shortly"), not `internal` with a nats-py traceback's words,
    when its registry does not answer: after a partition the rig's deployers met that for a while."""
    platform = platform_on(cluster.url)
    await platform.start_controlplane(**cluster.service_env("controlplane"), AUBE_KV_REPLICAS="3")
    first = nodes(cluster).nodes[0].url
    deployer = await nats.connect(first, **cluster.options("deployer"))
    try:
        listed = json.loads((await deployer.request(names.SUBJECT_LIST, b"{}", timeout=10)).data)
        assert listed["ok"] is True
        nodes(cluster).kill(1)
        nodes(cluster).kill(2)
        with anyio.fail_after(60):
            while True:
                try:
                    answer = json.loads((await deployer.request(names.SUBJECT_LIST, b"{}", timeout=15)).data)
                except nats.errors.Error:
                    await anyio.sleep(0.5)  # the control plane is moving to the node that stays
                    continue
                if not answer["ok"]:
                    break
                await anyio.sleep(0.5)
        print(f"answered without a quorum: {answer}")
        assert answer["error"]["code"] == "unavailable" and "retry shortly" in answer["error"]["message"]
    finally:
        await deployer.close()
