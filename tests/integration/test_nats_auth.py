"""deploy/nats.conf's accounts: no anonymous clients, each service its own user, each tenant its own account.

Runs the real configuration file (on free ports, its tenant includes rendered from a tenant list) with a real
control plane, proxy and reaper as their own NATS users, the real aube CLI and raw nats-py clients. Each test is an
attack a hostile deployer tried on the earlier single-account configuration (issue 8, findings 3, 4, 5 and 10).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy
from support import AccountsServer, accounts_server, zip_base64
from websockets.asyncio.client import connect

from aube.shared import agentlogins, credentials, kvread, names
from aube.shared.hostbook import HostBook
from aube.shared.natsserver import LocalNatsServer, find_nats_server, free_port, write_run_config
from aube.shared.registry import Registry
from aube.shared.schemas import HostLease, ScaleIntent, encode

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "deploy" / "nats.conf"
SECRET_ENV_VALUE = "s3cr3t-in-alices-env"


class Secured:
    """A platform on the real deploy/nats.conf with tenants `deployer` and `alice`."""

    def __init__(self, accounts: AccountsServer, platform: Any) -> None:
        self.accounts = accounts
        self.server = accounts.server
        self.secrets = accounts.secrets
        self.data = accounts.data
        self.platform = platform
        self.logins = {"deployer": accounts.login("deployer"), "alice": accounts.login("alice")}
        self.service_env = accounts.service_env

    @asynccontextmanager
    async def tenant(self, name: str, **options: Any) -> AsyncIterator[NATS]:
        nc = await nats.connect(self.server.url, **self.accounts.options(name), **options)
        try:
            yield nc
        finally:
            await nc.close()

    @asynccontextmanager
    async def service(self, name: str) -> AsyncIterator[tuple[NATS, Registry]]:
        login = self.secrets.service_login(name)
        nc = await nats.connect(self.server.url, user=login.user, password=login.password)
        try:
            yield nc, await Registry.open(nc.jetstream())
        finally:
            await nc.close()

    def cli(self, *argv: str, creds_file: Path) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "AUBE_NATS_URL": self.server.url, credentials.ENV_CREDENTIALS_FILE: str(creds_file)}
        return subprocess.run(
            [sys.executable, "-m", "aube.cli", *argv], env=env, capture_output=True, text=True, timeout=300, cwd=REPO
        )


@pytest.fixture
def secured(platform_on, tmp_path: Path):  # type: ignore[no-untyped-def]
    with accounts_server(tmp_path / "data-nats", tenants=["alice"]) as accounts:
        platform = platform_on(accounts.url)
        try:
            yield Secured(accounts, platform)
        finally:
            platform.stop_all()  # before the server goes; the fixture checks for leftovers


async def upload(nc: NATS, name: str, files: dict[str, str], timeout: float = 300) -> dict[str, Any]:
    body = {"name": name, "zip": zip_base64(REPO / "examples" / "reverse-async", files)}
    reply = await nc.request(names.SUBJECT_UPLOAD, json.dumps(body).encode(), timeout=timeout)
    return json.loads(reply.data)  # type: ignore[no-any-return]


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_anonymous_and_wrong_logins_are_refused_and_big_bundles_use_the_tenants_own_store(
    secured: Secured, tmp_path: Path
) -> None:
    await secured.platform.start_controlplane(**secured.service_env("controlplane"))
    # No anonymous clients, no wrong passwords (in a subprocess: nats-py leaks a socket on refusal).
    alice = secured.logins["alice"]
    assert alice is not None
    wrong = tmp_path / "wrong.env"
    wrong.write_text(f"{credentials.ENV_USER}=deployer\n{credentials.ENV_DEPLOYER_PASSWORD}=nope\n")
    # A tenant's password is no service's: alice cannot log in as the proxy (or as the fetch user of her account).
    as_proxy = tmp_path / "as-proxy.env"
    as_proxy.write_text(f"{credentials.ENV_USER}=aube-proxy\n{credentials.ENV_DEPLOYER_PASSWORD}={alice.password}\n")
    as_fetch = tmp_path / "as-fetch.env"
    as_fetch.write_text(
        f"{credentials.ENV_USER}=aube-fetch-alice\n{credentials.ENV_DEPLOYER_PASSWORD}={alice.password}\n"
    )
    for creds_file in (wrong, as_proxy, as_fetch):
        refused = secured.cli("ls", creds_file=creds_file)
        assert refused.returncode == 1 and "Authorization Violation" in refused.stderr
    missing = secured.cli("ls", creds_file=tmp_path / "missing.env")
    assert missing.returncode == 1 and "no credentials found at" in missing.stderr

    # A bundle above the 8 MB max payload travels through the object store of the tenant's own account.
    big = tmp_path / "big"
    big.mkdir()
    (big / "fn.py").write_text((REPO / "examples" / "reverse-async" / "fn.py").read_text())
    (big / "payload.bin").write_bytes(os.urandom(9 * 1024 * 1024))
    deployed = secured.cli("deploy", str(big), "big", creds_file=secured.data / "tenants" / "alice.env")
    assert deployed.returncode == 0, deployed.stderr
    assert json.loads(deployed.stdout)["url"].endswith("/big")
    async with secured.tenant("alice") as nc:
        store = await nc.jetstream().object_store(names.BUCKET_BUNDLES)
        with pytest.raises(nats.js.errors.NotFoundError):  # nats-py's word for "no objects": read, then deleted
            await store.list(ignore_deletes=True)
    async with secured.tenant("deployer") as nc:
        listed = json.loads((await nc.request(names.SUBJECT_LIST, b"{}", timeout=10)).data)
        assert listed == {"ok": True, "functions": []}  # alice's function is not the deployer's business


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_a_tenant_cannot_touch_another_tenants_function(secured: Secured) -> None:
    """Finding 10: with one shared deployer identity, anyone could overwrite, delete, list and follow anyone's."""
    await secured.platform.start_controlplane(**secured.service_env("controlplane"))
    async with secured.tenant("alice") as alice, secured.tenant("deployer") as mallory:
        seen_by_mallory: list[str] = []
        spy = await mallory.subscribe(names.events_subject("fa"), cb=None)
        own_events = await alice.subscribe(names.events_subject("fa"))
        ok = await upload(alice, "fa", {"aube.toml": f'[env]\nSECRET = "{SECRET_ENV_VALUE}"\n'})
        assert ok["ok"] is True, ok
        alice_saw = [json.loads((await own_events.next_msg(timeout=5)).data)["event"] for _ in range(2)]
        assert "accepted" in alice_saw

        taken = await upload(mallory, "fa", {})
        assert taken["error"]["code"] == "name_taken"
        deleted = json.loads((await mallory.request(names.SUBJECT_DELETE, b'{"name": "fa"}', timeout=30)).data)
        assert deleted["error"]["code"] == "unknown_function"
        listed = json.loads((await mallory.request(names.SUBJECT_LIST, b"{}", timeout=10)).data)
        assert listed["functions"] == []
        own = json.loads((await alice.request(names.SUBJECT_LIST, b"{}", timeout=10)).data)
        assert [f["name"] for f in own["functions"]] == ["fa"]
        await anyio.sleep(0.5)
        while True:
            try:
                seen_by_mallory.append((await spy.next_msg(timeout=0.2)).data.decode())
            except nats.errors.TimeoutError:
                break
        # Mallory's own refused upload may report to Mallory; nothing of alice's did.
        assert all('"accepted"' not in m and '"ready"' not in m for m in seen_by_mallory), seen_by_mallory
        async with secured.service("controlplane") as (_, registry):
            entry = await registry.get_function("fa")
            assert entry is not None and entry.record.tenant == "alice" and entry.record.version == 1

        # Through the CLI too.
        creds = secured.data / "credentials.env"
        refused = secured.cli("delete", "fa", creds_file=creds)
        assert refused.returncode == 1 and "unknown_function" in refused.stderr
        assert "fa" not in secured.cli("ls", creds_file=creds).stdout
        deleted = secured.cli("delete", "fa", creds_file=secured.data / "tenants" / "alice.env")
        assert deleted.returncode == 0, deleted.stderr


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_a_tenant_reads_no_registry_reply_and_forges_no_internal_request(secured: Secured) -> None:
    """Findings 4 and 5: `_INBOX.>` showed every KV reply (records with [env] secrets); a JetStream push consumer with
    `deliver_subject: aube.fn.scale` made the control plane scale or stop another tenant's instances."""
    secured.platform.start("aube.reaper", AUBE_REAP_INTERVAL="0.5", **secured.service_env("reaper"))
    await secured.platform.start_controlplane(**secured.service_env("controlplane"))
    port = free_port()
    secured.platform.start(
        "aube.proxy", AUBE_PROXY_PORT=str(port), AUBE_PROXY_HOST="127.0.0.1", **secured.service_env("proxy")
    )
    seen: list[tuple[str, bytes]] = []
    async with secured.tenant("deployer") as mallory, secured.tenant("alice") as alice:

        async def record(msg: Any) -> None:
            seen.append((msg.subject, msg.data))

        await mallory.subscribe(">", cb=record)
        await mallory.subscribe("_INBOX.>", cb=record)
        # One instance at most, so that any instance the forged requests would start or stop shows.
        manifest = f'[scaling]\nmax_instances = 1\n[env]\nSECRET = "{SECRET_ENV_VALUE}"\n'
        assert (await upload(alice, "fa", {"aube.toml": manifest}))["ok"]
        # Streams through the proxy (which claims as its own user) work; the registry traffic they cause is unseen.
        with anyio.fail_after(60):
            while True:
                try:
                    async with connect(f"ws://127.0.0.1:{port}/fa", proxy=None, open_timeout=10) as ws:
                        await ws.send("abc")
                        assert await ws.recv() == "cba"
                    break
                except (OSError, Exception) as e:  # the proxy may still be starting
                    if "403" in str(e) or "404" in str(e):
                        raise
                    await anyio.sleep(0.3)

        async with secured.service("controlplane") as (_, registry):
            (before,) = await registry.instances("fa")
        await mallory.request(names.SUBJECT_LIST, b"{}", timeout=10)  # the spy's own request and reply
        await mallory.flush()
        spied = list(seen)  # what the spy saw of the platform's work; from here on it sees its own forgeries
        # Forge internal requests from the tenant's own JetStream, as before: deliver stored messages to the
        # platform's internal subjects. In its own account those subjects reach nobody.
        js = mallory.jetstream()
        await js.add_stream(name="FORGE", subjects=["forge.>"])
        stop = {"name": "fa", "slot": before.record.slot, "instance_id": before.record.instance_id, "reason": "x"}
        await js.publish("forge.stop", json.dumps(stop).encode())
        await js.publish("forge.scale", b'{"name": "fa", "count": 5}')
        for subject, filt in ((names.SUBJECT_STOP_INSTANCE, "forge.stop"), (names.SUBJECT_SCALE, "forge.scale")):
            await js.add_consumer(
                "FORGE",
                ConsumerConfig(deliver_subject=subject, filter_subject=filt, deliver_policy=DeliverPolicy.ALL),
            )
        # And plain publishes to the registry's and the services' subjects.
        await mallory.publish(f"$KV.{names.BUCKET_INSTANCES}.fa.0", b"{}")
        await mallory.publish(names.SUBJECT_STOP_INSTANCE, json.dumps(stop).encode())
        await mallory.publish(names.SUBJECT_SCALE, b'{"name": "fa", "count": 3}')
        await mallory.flush()
        await anyio.sleep(3)
        async with secured.service("controlplane") as (_, registry):
            after = await registry.instances("fa")
        assert [(e.record.instance_id, e.record.state) for e in after] == [(before.record.instance_id, "free")]

        # Alice's bundle store is hers: Mallory's object store is another bucket altogether.
        alice_store = await alice.jetstream().create_object_store(names.BUCKET_BUNDLES)
        await alice_store.put("alice-upload", b"alice's bundle")
        try:
            mallory_store = await mallory.jetstream().object_store(names.BUCKET_BUNDLES)
            with pytest.raises(Exception, match="not found"):
                await mallory_store.get("alice-upload")
            await mallory.jetstream().purge_stream(f"OBJ_{names.BUCKET_BUNDLES}")
        except nats.js.errors.NotFoundError:
            pass  # Mallory has no store at all
        assert (await alice_store.get("alice-upload")).data == b"alice's bundle"

    # Registry records (an instance's address, a function's [env] and artifact) never reach the tenant's account.
    markers = (SECRET_ENV_VALUE.encode(), b'"instance_id"', b'"artifact"', b'"address"')
    leaked = [(s, d) for s, d in spied if any(m in d for m in markers)]
    assert leaked == []
    assert len(seen) > len(spied) > 0  # the spy was listening: it saw its own traffic
    # Before the forgeries, the spy saw nothing but events of its own functions (none) and its own requests.
    assert [s for s, _ in spied if not s.startswith("_INBOX.") and s != names.SUBJECT_LIST] == []


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_services_have_only_their_subjects(secured: Secured) -> None:
    """A proxy (which parses hostile clients' bytes) cannot rewrite function records or publish deploy requests."""
    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    login = secured.secrets.service_login("proxy")
    nc = await nats.connect(secured.server.url, user=login.user, password=login.password, error_cb=on_error)
    try:
        await nc.publish(f"$KV.{names.BUCKET_FUNCTIONS}.fa", b"{}")
        await nc.publish(names.SUBJECT_UPLOAD, b"{}")
        await nc.publish("aube.t.alice.fn.delete", b'{"name": "fa"}')
        await nc.flush()
        with anyio.fail_after(5):
            while len(errors) < 3:
                await anyio.sleep(0.05)
        assert all("permissions violation" in e.lower() for e in errors), errors
    finally:
        await nc.close()


async def test_only_proxies_write_scale_intents(tmp_path: Path) -> None:
    """The scale-intents bucket is the proxies': a proxy opens the registry and takes an intent as its own NATS user;
    the reaper's user is refused any write to it (and still opens the registry it needs), and a tenant's write lands
    in its own account at most, never in the platform's bucket."""
    with accounts_server(tmp_path / "data-nats", tenants=["alice"]) as accounts:
        errors: dict[str, list[str]] = {"proxy": [], "reaper": []}

        async def connect_as(service: str) -> NATS:
            async def on_error(e: Exception) -> None:
                errors[service].append(str(e))

            login = accounts.secrets.service_login(service)
            return await nats.connect(accounts.url, user=login.user, password=login.password, error_cb=on_error)

        proxy_nc, reaper_nc = await connect_as("proxy"), await connect_as("reaper")
        try:
            proxy = await Registry.open(proxy_nc.jetstream())
            now = time.time()
            crashed = ScaleIntent(function="fa", proxy_id="proxy-0", asked_at=now - 10, expires_at=now - 8)
            mine = ScaleIntent(function="fa", proxy_id="proxy-1", asked_at=now, expires_at=now + 60)
            assert await proxy.take_scale_intent(crashed)  # created
            assert await proxy.take_scale_intent(mine)  # taken over by compare-and-set
            assert not await proxy.take_scale_intent(msgspec.structs.replace(mine, proxy_id="proxy-2"))

            reaper = await Registry.open(reaper_nc.jetstream(), scale_intents=False)
            assert await reaper.leases() == []
            forged = encode(ScaleIntent(function="fa", proxy_id="reaper", asked_at=now, expires_at=now + 1))
            await reaper_nc.publish(f"$KV.{names.BUCKET_SCALE_INTENTS}.fa", forged)
            await reaper_nc.publish(f"$JS.API.STREAM.PURGE.KV_{names.BUCKET_SCALE_INTENTS}", b"{}")
            await reaper_nc.flush()
            async with tenant_connection(accounts, "alice") as alice:
                await alice.publish(f"$KV.{names.BUCKET_SCALE_INTENTS}.fa", forged)
                await alice.flush()
            with anyio.move_on_after(5):
                while len(errors["reaper"]) < 2:
                    await anyio.sleep(0.05)
            entry = await proxy.get_scale_intent("fa")
            assert entry is not None and entry.record == mine
            assert len(errors["reaper"]) == 2, errors
            assert all("permissions violation" in e.lower() for e in errors["reaper"]), errors
            assert errors["proxy"] == []
        finally:
            await proxy_nc.close()
            await reaper_nc.close()


@asynccontextmanager
async def tenant_connection(accounts: AccountsServer, name: str) -> AsyncIterator[NATS]:
    nc = await nats.connect(accounts.url, **accounts.options(name))
    try:
        yield nc
    finally:
        await nc.close()


async def test_a_tenant_added_and_reloaded_can_log_in_and_none_other_can_import_its_subjects(tmp_path: Path) -> None:
    data = tmp_path / "data"
    secrets = credentials.platform_secrets(data)
    credentials.ensure_default_tenant(data, data / "credentials.env")
    hashes = json.loads((data / credentials.TENANT_LIST_FILE).read_text())
    with LocalNatsServer(config=CONF, env=secrets.environment(), tenant_hashes=hashes) as server:
        login, path = credentials.add_tenant(data, "bob")
        assert path == data / "tenants" / "bob.env" and oct(path.stat().st_mode & 0o777) == "0o600"
        server.reload(json.loads((data / credentials.TENANT_LIST_FILE).read_text()))
        with anyio.fail_after(10):
            while True:
                try:
                    nc = await nats.connect(server.url, user="bob", password=login.password, max_reconnect_attempts=0)
                    break
                except Exception:
                    await asyncio.sleep(0.2)
        await nc.close()
    with pytest.raises(Exception, match="exists already"):
        credentials.add_tenant(data, "bob")
    for bad in ("Bob", "aube-x", "a.b", "-x", "x" * 40, ""):
        with pytest.raises(Exception, match="invalid tenant name"):
            credentials.add_tenant(data, bad)
    # A hand-edited tenants.conf that imports another tenant's subjects is refused by the server as a whole.
    conf = write_run_config(CONF, tmp_path / "conf", json.loads((data / credentials.TENANT_LIST_FILE).read_text()))
    tenants_conf = conf.parent / "tenants.conf"
    tenants_conf.write_text(tenants_conf.read_text().replace("aube.t.bob.fn.upload", "aube.t.deployer.fn.upload"))
    checked = subprocess.run(
        [find_nats_server(), "-c", str(conf), "-t"], env={**os.environ, **secrets.environment()},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert checked.returncode != 0 and "not authorized" in checked.stderr + checked.stdout


def test_deploy_nats_conf_accepts_every_generated_password(tmp_path: Path) -> None:
    """`nats-server -t` checks the real config with the passwords in its environment, as `aube start` passes them.
    Before passwords were letters and digits, about 1 in 32 starts failed with "variable reference ... could not be
    parsed"."""
    for i in range(20):
        data = tmp_path / f"d{i}"
        secrets = credentials.platform_secrets(data)
        credentials.ensure_default_tenant(data, data / "credentials.env")
        conf = write_run_config(CONF, data / "conf", json.loads((data / credentials.TENANT_LIST_FILE).read_text()))
        checked = subprocess.run(
            [find_nats_server(), "-c", str(conf), "-t"],
            env={**os.environ, **secrets.environment()},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert checked.returncode == 0, checked.stderr + checked.stdout


async def test_host_agents_keep_their_lease_and_read_but_write_no_registry_entry(tmp_path: Path) -> None:
    """An agent runs other people's code on its host: it may keep its host lease, read the instances and the versions'
    folders, and answer its requests, but a compromised one cannot rewrite entries or function records, deploy, ask
    for stops, nor answer as the control plane; a tenant cannot reach the host subjects at all."""
    with accounts_server(tmp_path / "data-nats", tenants=["alice"], hosts=["h1"]) as accounts:
        errors: list[str] = []

        async def on_error(e: Exception) -> None:
            errors.append(str(e))

        cp_login = accounts.secrets.service_login("controlplane")
        cp = await nats.connect(accounts.url, user=cp_login.user, password=cp_login.password)
        await Registry.open(cp.jetstream())  # the control plane creates the registry's buckets
        await cp.close()
        nc = await agent_connection(accounts, "h1", error_cb=on_error)
        try:
            book = await HostBook.open(nc.jetstream())
            now = time.time()
            await book.put(HostLease(host_id="h1", runtime="docker", capacity=5, started_at=now, renewed_at=now))
            assert (await book.kv.get("h1")).value is not None
            assert await kvread.snapshot(nc.jetstream(), names.BUCKET_INSTANCES) == []  # it reads the instances
            forbidden = [
                f"$KV.{names.BUCKET_INSTANCES}.fa.0",
                f"$KV.{names.BUCKET_FUNCTIONS}.fa",
                f"$KV.{names.BUCKET_LEASES}.p1",
                names.SUBJECT_UPLOAD,
                names.SUBJECT_STOP_INSTANCE,
                names.SUBJECT_SCALE,
            ]
            for subject in forbidden:
                await nc.publish(subject, b"{}")
            await nc.flush()
            with anyio.move_on_after(5):
                while len(errors) < len(forbidden):
                    await anyio.sleep(0.05)
            assert len(errors) == len(forbidden), errors
            assert all("permissions violation" in e.lower() for e in errors), errors
        finally:
            await nc.close()
        async with tenant_connection(accounts, "alice") as alice:
            with pytest.raises((nats.errors.NoRespondersError, nats.errors.TimeoutError)):
                await alice.request(names.host_subject("h1", "list"), b"{}", timeout=2)


async def agent_connection(accounts: AccountsServer, host_id: str, **options: Any) -> NATS:
    """A connection as `host_id`'s agent logs in: its own user, its own inbox prefix."""
    env = accounts.agent_env(host_id)
    return await nats.connect(
        accounts.url,
        user=env["AUBE_NATS_USER"],
        password=env["AUBE_NATS_PASSWORD"],
        inbox_prefix=agentlogins.inbox_prefix(host_id),
        **options,
    )


async def test_a_host_agent_cannot_act_for_another_host(tmp_path: Path) -> None:
    """A host whose root a function reached holds its agent's login. With one login shared by every agent it could
    answer another host's start requests first (the control plane records the address in the answer: proxies would
    relay that host's clients to it), read them (each instance's secret), publish exits in another host's name and
    overwrite its lease, or read every reply in the platform account. Each agent now has its own user."""
    with accounts_server(tmp_path / "data-nats", hosts=["h1", "h2"]) as accounts:
        cp_login = accounts.secrets.service_login("controlplane")
        cp = await nats.connect(accounts.url, user=cp_login.user, password=cp_login.password)
        await Registry.open(cp.jetstream())
        await HostBook.open(cp.jetstream())
        errors: list[str] = []

        async def on_error(e: Exception) -> None:
            errors.append(str(e))

        h1 = await agent_connection(accounts, "h1", error_cb=on_error)
        h2 = await agent_connection(accounts, "h2")
        try:
            # What h1 may do, it can: answer its own requests, publish its own exits, keep its own lease.
            own = await h1.subscribe(names.host_subject("h1", "start"))
            await h1.flush()
            reply_to = cp.new_inbox()
            answers = await cp.subscribe(reply_to)
            await cp.publish(names.host_subject("h1", "start"), b"{}", reply=reply_to)
            request = await own.next_msg(timeout=5)
            await request.respond(b"started")
            assert (await answers.next_msg(timeout=5)).data == b"started"
            now = time.time()
            lease = HostLease(host_id="h1", runtime="docker", capacity=5, started_at=now, renewed_at=now)
            await (await HostBook.open(h1.jetstream())).put(lease)
            assert errors == []

            # Another host's requests and every other inbox: refused subscriptions.
            refused = [
                await h1.subscribe(subject)
                for subject in (
                    names.host_subject("h2", "start"),
                    "aube.host.*.start",
                    "aube.host.>",
                    "_INBOX.>",
                    f"{agentlogins.inbox_prefix('h2')}.>",
                    ">",
                )
            ]
            # Another host's exits and lease: refused publishes.
            forged = HostLease(host_id="h2", runtime="docker", capacity=5, started_at=now, renewed_at=now)
            await h1.publish(names.host_subject("h2", names.HOST_EXITS), b"{}")
            await h1.publish(f"$KV.{names.BUCKET_HOSTS}.h2", encode(forged))
            await h1.flush()
            with anyio.move_on_after(5):
                while len(errors) < 8:
                    await anyio.sleep(0.05)
            assert len(errors) == 8, errors
            assert all("permissions violation" in e.lower() for e in errors), errors

            # A start request for h2 reaches h2's agent alone; h1 never sees it.
            theirs = await h2.subscribe(names.host_subject("h2", "start"))
            await h2.flush()
            # Published until h2 has it (CI once missed a single publish under load: core NATS is at most once).
            with anyio.fail_after(20):
                while True:
                    await cp.publish(names.host_subject("h2", "start"), b"secret-bearing spec")
                    await cp.flush()
                    try:
                        assert (await theirs.next_msg(timeout=1)).data == b"secret-bearing spec"
                        break
                    except nats.errors.TimeoutError:
                        continue
            for sub in refused:
                with pytest.raises(nats.errors.TimeoutError):
                    await sub.next_msg(timeout=0.2)
            assert (await (await cp.jetstream().key_value(names.BUCKET_HOSTS)).get("h1")).value is not None
            with pytest.raises(nats.js.errors.KeyNotFoundError):
                await (await cp.jetstream().key_value(names.BUCKET_HOSTS)).get("h2")
        finally:
            await h1.close()
            await h2.close()
            await cp.close()
        # The login every agent shared once is gone: h1's password under that name is refused too.
        assert login_refused(accounts.url, "aube-agent", accounts.agent_env("h1")["AUBE_NATS_PASSWORD"])
        assert not login_refused(accounts.url, "aube-agent-h1", accounts.agent_env("h1")["AUBE_NATS_PASSWORD"])


def login_refused(url: str, user: str, password: str) -> bool:
    """Whether the server refuses this login, asked by hand (nats-py leaks a socket when it is refused)."""
    host, _, port = url.removeprefix("nats://").rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.recv(4096)  # INFO
        connect = json.dumps({"user": user, "pass": password, "verbose": False, "pedantic": False})
        conn.sendall(f"CONNECT {connect}\r\nPING\r\n".encode())
        reply = conn.recv(4096)
    assert reply.startswith((b"PONG", b"-ERR")), reply
    return b"Authorization Violation" in reply


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_the_cli_finds_the_servers_in_the_credentials_file_it_is_given(secured: Secured, tmp_path: Path) -> None:
    """The rig's credentials file names its NATS servers: `AUBE_CREDENTIALS=<it> aube ls` reaches them without
    AUBE_NATS_URL (it went to the default server before, which is not the one that knows this login)."""
    await secured.platform.start_controlplane(**secured.service_env("controlplane"))
    alice = secured.logins["alice"]
    creds = tmp_path / "alice-with-servers.env"
    creds.write_text(
        f"{credentials.ENV_USER}=alice\n{credentials.ENV_DEPLOYER_PASSWORD}={alice.password}\n"
        f"AUBE_NATS_URL={secured.server.url}\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "AUBE_NATS_URL"}
    env[credentials.ENV_CREDENTIALS_FILE] = str(creds)
    argv = [sys.executable, "-m", "aube.cli", "ls", "--json"]
    listed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []
