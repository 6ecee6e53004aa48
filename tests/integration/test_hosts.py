"""Instances placed on host agents (issue 10): real agents, control plane, reaper and proxy processes on the real
deploy/nats.conf, each agent running the process runtime under its own host id and data folder, as hosts would.

The cluster rig (tests/cluster) runs the same on Docker-in-Docker hosts; this test keeps the logic in `make test`.
"""

from __future__ import annotations

import base64
import io
import zipfile
from collections import Counter
from pathlib import Path

import anyio
import nats
import pytest
from harness import Platform, ServiceProcess, stop_process_instances
from support import REPO, AccountsServer, accounts_server
from websockets.asyncio.client import connect

from aube.controlplane.runtimes.hosts import QUICK_TIMEOUT
from aube.shared import names
from aube.shared.bus import request
from aube.shared.hostbook import HostBook
from aube.shared.natsserver import free_port
from aube.shared.registry import Registry
from aube.shared.schemas import UploadReply, UploadRequest

pytestmark = pytest.mark.anyio

HOSTS = ("h1", "h2")
LEASE_TTL = 2.0


def whoami_zip(manifest: str) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("fn.py", (REPO / "examples" / "whoami" / "fn.py").read_text())
        z.writestr("aube.toml", manifest)
    return base64.b64encode(buf.getvalue()).decode()


def start_agents(
    platform: Platform, server: AccountsServer, data: dict[str, str], lease_ttl: float = LEASE_TTL, **env: str
) -> dict[str, ServiceProcess]:
    """One agent per host of HOSTS, each on the process runtime with its own data folder and its own login."""
    return {
        h: platform.start(
            "aube.agent",
            AUBE_RUNTIME="process",
            AUBE_DATA_DIR=data[h],
            AUBE_LEASE_TTL=str(lease_ttl),
            **env,
            **server.agent_env(h),
        )
        for h in HOSTS
    }


async def hosts_of(registry: Registry, function: str, state: str = "free") -> Counter[str]:
    return Counter(e.record.host for e in await registry.instances(function) if e.record.state == state)


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_instances_spread_over_hosts_and_a_dead_hosts_pool_is_rebuilt_on_the_others(
    runtime_kind: str, test_owner: str, tmp_path: Path
) -> None:
    with accounts_server(tmp_path / "nats", hosts=HOSTS) as server:
        platform = Platform(server.url, test_owner, "hosts", tmp_path)
        data = {h: str(tmp_path / f"host-{h}") for h in HOSTS}
        try:
            agents = start_agents(platform, server, data, AUBE_RECONCILE_INTERVAL="1")
            await platform.start_controlplane(AUBE_HOST_RUNTIME="process", **server.service_env("controlplane"))
            platform.start("aube.reaper", AUBE_LEASE_TTL=str(LEASE_TTL), **server.service_env("reaper"))
            port = free_port()
            platform.start(
                "aube.proxy",
                AUBE_PROXY_PORT=str(port),
                AUBE_OPERATOR_PORT=str(free_port()),
                **server.service_env("proxy"),
            )
            nc = await nats.connect(server.url, **server.options("deployer"))
            ops = await nats.connect(server.url, **platform.login)
            try:
                registry = await Registry.open(ops.jetstream())
                manifest = "[scaling]\nmin_free = 4\nmax_instances = 8\n"
                body = UploadRequest(name="who", zip=whoami_zip(manifest))
                reply = await request(nc, names.SUBJECT_UPLOAD, body, UploadReply, 300)
                assert reply.instances == 4
                assert await hosts_of(registry, "who") == {"h1": 2, "h2": 2}  # spread

                # Streams through the proxy reach both hosts.
                seen: set[str] = set()
                async with anyio.create_task_group() as tg:

                    async def stream() -> None:
                        async with connect(f"ws://127.0.0.1:{port}/who", proxy=None, open_timeout=30) as ws:
                            await ws.send("hi")
                            seen.add(await ws.recv())  # type: ignore[arg-type]
                            await anyio.sleep(1)

                    for _ in range(4):
                        tg.start_soon(stream)
                by_id = {e.record.instance_id: e.record.host for e in await registry.instances("who")}
                import json

                assert {by_id.get(json.loads(s)["instance"]) for s in seen} == {"h1", "h2"}

                # h2 dies with its instances: its entries go within a lease TTL plus 4 s, and min_free is warm again
                # on h1 without a client.
                agents["h2"].kill9()
                stop_process_instances(f"{test_owner}-h2", data["h2"])
                died = anyio.current_time()
                with anyio.fail_after(LEASE_TTL * 2 + 4 + 10):
                    while (await hosts_of(registry, "who", "free")).get("h2") or any(
                        e.record.host == "h2" for e in await registry.instances("who")
                    ):
                        await anyio.sleep(0.1)
                gone_after = anyio.current_time() - died
                print(f"dead host's entries gone after {gone_after:.1f}s")
                assert gone_after < LEASE_TTL + 4 + 3  # + a margin for this loaded machine
                with anyio.fail_after(30):
                    while (await hosts_of(registry, "who")).get("h1", 0) < 4:
                        await anyio.sleep(0.2)
                print(f"min_free warm again on h1 after {anyio.current_time() - died:.1f}s")
                assert anyio.current_time() - died < 15 + 5
                async with connect(f"ws://127.0.0.1:{port}/who", proxy=None, open_timeout=30) as ws:
                    await ws.send("after")
                    assert json.loads(await ws.recv())["instance"] in {  # type: ignore[arg-type]
                        e.record.instance_id for e in await registry.instances("who") if e.record.host == "h1"
                    }
            finally:
                await nc.close()
                await ops.close()
        finally:
            platform.stop_all()
            for h in HOSTS:
                stop_process_instances(f"{test_owner}-{h}", data[h])


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_a_start_on_a_host_that_stopped_answering_goes_elsewhere_once_its_lease_lapses(
    runtime_kind: str, test_owner: str, tmp_path: Path
) -> None:
    """A start may wait minutes for a build (AUBE_HOST_TIMEOUT); a host that dies meanwhile answers nothing, and
    the server keeps its subscriptions until its own pings fail. The start used to wait out the whole timeout (the
    keeper could not rebuild the pool for a minute after a host kill on the rig); now it is given up once the host's
    lease lapses, and the instance is placed on another host."""
    import os
    import signal

    from aube.shared.schemas import ScaleReply, ScaleRequest

    with accounts_server(tmp_path / "nats", hosts=HOSTS) as server:
        platform = Platform(server.url, test_owner, "hosts", tmp_path)
        data = {h: str(tmp_path / f"host-{h}") for h in HOSTS}
        agents = start_agents(platform, server, data)
        try:
            await platform.start_controlplane(
                AUBE_HOST_RUNTIME="process", AUBE_HOST_TIMEOUT="120", **server.service_env("controlplane")
            )
            ops = await nats.connect(server.url, **platform.login)
            try:
                registry = await Registry.open(ops.jetstream())
                body = UploadRequest(name="who", zip=whoami_zip("[scaling]\nmin_free = 0\nmax_instances = 4\n"))
                await request(ops, names.SUBJECT_UPLOAD, body, UploadReply, 300)
                paused = agents["h1"].proc
                assert paused is not None
                os.kill(paused.pid, signal.SIGSTOP)
                try:
                    asked = anyio.current_time()
                    with anyio.fail_after(60):
                        reply = await request(
                            ops, names.SUBJECT_SCALE, ScaleRequest(name="who", count=2), ScaleReply, 120
                        )
                    took = anyio.current_time() - asked
                    print(f"scale of 2 answered after {took:.1f}s with h1 stopped (its lease: {LEASE_TTL}s)")
                    assert reply.ok
                    assert await hosts_of(registry, "who") == {"h2": 2}
                finally:
                    os.kill(paused.pid, signal.SIGCONT)
            finally:
                await ops.close()
        finally:
            platform.stop_all()
            for h in HOSTS:
                stop_process_instances(f"{test_owner}-{h}", data[h])


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_a_host_agent_that_points_registry_records_at_internal_subjects_changes_nothing(
    runtime_kind: str, test_owner: str, tmp_path: Path
) -> None:
    """An agent reads the instances through a JetStream consumer, and JetStream does not check a push consumer's
    deliver subject against its creator's permissions: a compromised host can have the server publish every instance
    record onto any subject of the platform account (the other hosts' exits, the control plane's stop and scale).
    None of those records reads as such a request (their fields differ, a handle names its own host), so nothing is
    stopped, dropped or started. This test keeps it so."""
    from nats.js.api import ConsumerConfig, DeliverPolicy

    from aube.shared import agentlogins

    with accounts_server(tmp_path / "nats", hosts=HOSTS) as server:
        platform = Platform(server.url, test_owner, "hosts", tmp_path)
        data = {h: str(tmp_path / f"host-{h}") for h in HOSTS}
        start_agents(platform, server, data)
        try:
            await platform.start_controlplane(AUBE_HOST_RUNTIME="process", **server.service_env("controlplane"))
            ops = await nats.connect(server.url, **platform.login)
            env = server.agent_env("h1")
            h1 = await nats.connect(
                server.url,
                user=env["AUBE_NATS_USER"],
                password=env["AUBE_NATS_PASSWORD"],
                inbox_prefix=agentlogins.inbox_prefix("h1"),
            )
            try:
                registry = await Registry.open(ops.jetstream())
                body = UploadRequest(name="who", zip=whoami_zip("[scaling]\nmin_free = 4\nmax_instances = 4\n"))
                await request(ops, names.SUBJECT_UPLOAD, body, UploadReply, 300)
                before = {(e.key, e.record.instance_id, e.record.state) for e in await registry.instances("who")}
                assert len(before) == 4
                for target in (
                    names.host_subject("h2", names.HOST_EXITS),
                    names.SUBJECT_STOP_INSTANCE,
                    names.SUBJECT_SCALE,
                    names.SUBJECT_UPLOAD,
                    names.SUBJECT_DELETE,
                ):
                    for _ in range(3):
                        config = ConsumerConfig(deliver_subject=target, deliver_policy=DeliverPolicy.ALL)
                        await h1.jetstream().add_consumer(f"KV_{names.BUCKET_INSTANCES}", config)
                await anyio.sleep(3)  # the records delivered, the control plane's handlers run
                after = {(e.key, e.record.instance_id, e.record.state) for e in await registry.instances("who")}
                assert after == before
                assert (await registry.get_function("who")) is not None
            finally:
                await h1.close()
                await ops.close()
        finally:
            platform.stop_all()
            for h in HOSTS:
                stop_process_instances(f"{test_owner}-{h}", data[h])


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_a_host_whose_lease_only_looks_expired_keeps_its_entries_through_reconcile(
    runtime_kind: str, test_owner: str, tmp_path: Path
) -> None:
    """CI on the rig: a partitioned NATS leader left the hosts' leases unrenewable for seconds, every lease looked
    expired by the clock, the control plane's reconcile listed no host and took every entry for an instance gone
    (each long stream on the rig cut). A host missing from the listing says nothing about its instances: only the
    reaper judges a host dead (after watching its lease, with a leader to renew it on). Here no reaper runs and one
    agent is stopped past its lease: its entries must survive the control plane's reconcile passes."""
    import os
    import signal

    with accounts_server(tmp_path / "nats", hosts=HOSTS) as server:
        platform = Platform(server.url, test_owner, "hosts", tmp_path)
        data = {h: str(tmp_path / f"host-{h}") for h in HOSTS}
        agents = start_agents(platform, server, data)
        try:
            await platform.start_controlplane(
                AUBE_HOST_RUNTIME="process", AUBE_RECONCILE_INTERVAL="0.5", **server.service_env("controlplane")
            )
            ops = await nats.connect(server.url, **platform.login)
            try:
                registry = await Registry.open(ops.jetstream())
                book = await HostBook.open(ops.jetstream())
                with anyio.fail_after(30):
                    while {e.key for e in await book.leases()} != set(HOSTS):
                        await anyio.sleep(0.2)
                body = UploadRequest(name="who", zip=whoami_zip("[scaling]\nmin_free = 4\nmax_instances = 8\n"))
                await request(ops, names.SUBJECT_UPLOAD, body, UploadReply, 300)
                before = {e.key for e in await registry.instances("who") if e.record.host == "h1"}
                assert before, "nothing placed on h1"
                paused = agents["h1"].proc
                assert paused is not None
                os.kill(paused.pid, signal.SIGSTOP)
                try:
                    # Its lease lapses after LEASE_TTL; a listing asked of it before gives up after QUICK_TIMEOUT;
                    # then reconcile passes list h2 alone, every half second.
                    await anyio.sleep(LEASE_TTL + QUICK_TIMEOUT + 4)
                    after = {e.key for e in await registry.instances("who") if e.record.host == "h1"}
                finally:
                    os.kill(paused.pid, signal.SIGCONT)
                assert after == before, f"h1's entries dropped while only its lease looked expired: {before - after}"
            finally:
                await ops.close()
        finally:
            platform.stop_all()
            for h in HOSTS:
                stop_process_instances(f"{test_owner}-{h}", data[h])


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_a_control_plane_starts_while_a_live_host_does_not_answer(
    runtime_kind: str, test_owner: str, tmp_path: Path
) -> None:
    """CI once saw the control plane exit at startup: one agent had written its lease but did not answer the startup
    reconcile's listing yet, and the listing raised. A host that does not answer is now left out of the listing (its
    entries untouched, its judgement the reaper's), so the control plane starts and places on the host that answers.
    Here the silent host is an agent stopped with SIGSTOP while its lease (30 s) is still live."""
    import os
    import signal

    from aube.shared.schemas import ScaleReply, ScaleRequest

    with accounts_server(tmp_path / "nats", hosts=HOSTS) as server:
        platform = Platform(server.url, test_owner, "hosts", tmp_path)
        data = {h: str(tmp_path / f"host-{h}") for h in HOSTS}
        agents = start_agents(platform, server, data, lease_ttl=30)
        silent = agents["h1"].proc
        assert silent is not None
        cp_env = server.service_env("controlplane")
        try:
            # The control plane's login, as the harness uses once the control plane runs (it does not yet).
            ops = await nats.connect(server.url, user=cp_env["AUBE_NATS_USER"], password=cp_env["AUBE_NATS_PASSWORD"])
            try:
                book = await HostBook.open(ops.jetstream())
                with anyio.fail_after(60):
                    while {e.key for e in await book.leases()} != set(HOSTS):
                        await anyio.sleep(0.2)
                os.kill(silent.pid, signal.SIGSTOP)
                try:
                    await platform.start_controlplane(AUBE_HOST_RUNTIME="process", **cp_env)
                    registry = await Registry.open(ops.jetstream())
                    body = UploadRequest(name="who", zip=whoami_zip("[scaling]\nmin_free = 0\nmax_instances = 4\n"))
                    await request(ops, names.SUBJECT_UPLOAD, body, UploadReply, 300)
                    reply = await request(ops, names.SUBJECT_SCALE, ScaleRequest(name="who", count=1), ScaleReply, 120)
                    assert reply.ok
                    assert await hosts_of(registry, "who") == {"h2": 1}
                finally:
                    os.kill(silent.pid, signal.SIGCONT)
            finally:
                await ops.close()
        finally:
            platform.stop_all()
            for h in HOSTS:
                stop_process_instances(f"{test_owner}-{h}", data[h])
