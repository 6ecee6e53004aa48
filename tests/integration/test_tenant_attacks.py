"""A red team's attacks on the tenant layer (issue 8): a tenant with valid credentials, a local process, and the
files the operator's tools write. Real nats-server on the real deploy/nats.conf (tests/support.accounts_server),
real processes; each test is an attack, and says whether it worked before the fix it comes with.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest
from nats.aio.client import Client as NATS
from support import accounts_server, zip_base64

from aube.cli.platform import add_tenant
from aube.shared import credentials, names
from aube.shared import tenants as tenancy
from aube.shared.errors import InvalidRequest
from aube.shared.natsserver import ACCOUNTS_FILE, LocalNatsServer, free_port, write_run_config
from aube.shared.registry import Registry

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "deploy" / "nats.conf"


def test_the_rendered_server_config_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """tenants.conf holds every tenant's bcrypt hash: it was written 0644 into a 0755 folder, readable by any local
    user (a function running as a process, say), who could then try passwords offline."""
    data = tmp_path / "data"
    credentials.platform_secrets(data)
    credentials.ensure_default_tenant(data, data / "credentials.env")
    hashes = json.loads((data / credentials.TENANT_LIST_FILE).read_text())
    conf = write_run_config(CONF, data / "nats" / "conf", hashes)
    assert (conf.parent / ACCOUNTS_FILE).read_text().count("$2") >= 1  # the hashes are there
    assert oct(conf.parent.stat().st_mode & 0o777) == "0o700"
    for written in conf.parent.iterdir():
        assert oct(written.stat().st_mode & 0o777) == "0o600", written
    # Written again over an existing, more open file (an earlier version's): closed too.
    (conf.parent / ACCOUNTS_FILE).chmod(0o644)
    conf.parent.chmod(0o755)
    write_run_config(CONF, data / "nats" / "conf", hashes)
    assert oct((conf.parent / ACCOUNTS_FILE).stat().st_mode & 0o777) == "0o600"
    assert oct(conf.parent.stat().st_mode & 0o777) == "0o700"


def test_tenant_add_does_not_signal_a_process_that_merely_mentions_nats_server(tmp_path: Path) -> None:
    """A stale pid file whose pid now belongs to, e.g., the operator's `tail -f .data/nats/nats-server.log`: the old
    check (b"nats-server" anywhere in the command line) sent it SIGHUP, which ends it."""
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "tail", "-f", ".data/nats/nats-server.log"],
        start_new_session=True,
    )
    try:
        pid_file = tmp_path / ".data" / "nats" / "nats-server.pid"
        pid_file.parent.mkdir(parents=True)
        pid_file.write_text(f"{bystander.pid}\n")
        path, reloaded = add_tenant("bob", nats_conf=CONF, workdir=tmp_path)
        assert path == tmp_path / ".data" / "tenants" / "bob.env"
        assert reloaded is False
        with pytest.raises(subprocess.TimeoutExpired):
            bystander.wait(1.0)  # still alive: no SIGHUP reached it
    finally:
        bystander.kill()
        bystander.wait()
    # The real server, by its own pid file (relative to its working directory, as under `aube start`), is reloaded.
    workdir = tmp_path / "work"
    with server_as_aube_start_runs_it(workdir) as (server, url):
        _, reloaded = add_tenant("carol", nats_conf=CONF, workdir=workdir)
        assert reloaded is True
        assert server.poll() is None
        carol = credentials.load_login(workdir / ".data" / "tenants" / "carol.env")
        assert carol is not None
        assert _connect_elsewhere(url, {"user": "carol", "password": carol.password}).strip() == "connected"


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def server_as_aube_start_runs_it(workdir: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """nats-server as `aube start` runs it: from `workdir`, on <workdir>/.data/nats/conf, with its pid file there;
    the platform's secrets and the default tenant made first. The server and its client URL, once it is ready."""
    from aube.cli.platform import write_tenant_config
    from aube.shared.natsserver import find_nats_server

    data = workdir / ".data"
    secrets = credentials.platform_secrets(data)
    credentials.ensure_default_tenant(data, data / "credentials.env")
    conf = write_tenant_config(CONF, data)
    port, monitor = free_port(), free_port()
    argv = [find_nats_server(), "-c", str(conf), "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor)]
    log = (workdir / "nats.log").open("wb")
    server = subprocess.Popen(
        argv, cwd=workdir, env={**os.environ, **secrets.environment()}, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 20
        while not (data / "nats" / "nats-server.pid").exists() or not _accepts(port):
            assert time.monotonic() < deadline and server.poll() is None, "nats-server did not start"
            time.sleep(0.1)
        yield server, f"nats://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)
        log.close()


async def _connect(url: str, options: dict[str, str]) -> NATS:
    return await nats.connect(
        url, **options, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3
    )  # fmt: skip


def _connect_elsewhere(url: str, options: dict[str, str], subscriptions: int = 0) -> str:
    """Connect from another process (and subscribe `subscriptions` times); what it printed: the error, or
    "connected" (when still connected after its subscriptions)."""
    code = (
        "import asyncio, sys, nats\n"
        "async def main():\n"
        "    nc = await nats.connect(sys.argv[1], user=sys.argv[2], password=sys.argv[3], allow_reconnect=False,\n"
        "                            max_reconnect_attempts=0, connect_timeout=3)\n"
        "    for i in range(int(sys.argv[4])):\n"
        "        await nc.subscribe(f'x.{i}')\n"
        "    await nc.flush()\n"
        "    await asyncio.sleep(0.5)\n"
        "    print('connected' if nc.is_connected else 'closed by the server')\n"
        "    await nc.close()\n"
        "try:\n"
        "    asyncio.run(main())\n"
        "except Exception as e:\n"
        "    print(e)\n"
    )
    argv = [sys.executable, "-c", code, url, options["user"], options["password"], str(subscriptions)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout


async def test_a_tenant_cannot_exhaust_the_servers_connections_or_jetstream(tmp_path: Path) -> None:
    """A tenant's account had a storage quota but no other limit: it could open connections and create JetStream
    streams and consumers without end (measured: 300 streams, 300 consumers, 100 connections, all accepted), a
    cost the whole server (every tenant, the platform's registry) pays. Subscriptions too (20000 accepted)."""
    with accounts_server(tmp_path / "data", ["alice"]) as server:
        alice = server.options("alice")
        nc = await _connect(server.url, alice)
        opened: list[NATS] = []
        try:
            js = nc.jetstream()
            # What the platform needs keeps working: the tenant's bundle store and reads of it.
            store = await js.create_object_store(names.BUCKET_BUNDLES)
            await store.put("b", b"bundle")
            assert (await store.get("b")).data == b"bundle"
            for i in range(tenancy.TENANT_MAX_STREAMS - 1):  # the bundle store is one
                await js.add_stream(name=f"S{i}", subjects=[f"s{i}.>"])
            with pytest.raises(nats.js.errors.BadRequestError, match="maximum number of streams"):
                await js.add_stream(name="one-too-many", subjects=["more.>"])
            for i in range(tenancy.TENANT_MAX_CONSUMERS):
                await js.add_consumer("S0", durable_name=f"c{i}")
            with pytest.raises(nats.js.errors.BadRequestError, match="maximum consumers"):
                await js.add_consumer("S0", durable_name="one-too-many")
            # Subscriptions are bounded too (20000 were accepted): past the limit the server closes the connection.
            assert _connect_elsewhere(server.url, alice, subscriptions=100).strip() == "connected"
            too_many = tenancy.TENANT_MAX_SUBSCRIPTIONS + 1
            assert _connect_elsewhere(server.url, alice, subscriptions=too_many).strip() == "closed by the server"
            for _ in range(tenancy.TENANT_MAX_CONNECTIONS - 1):
                opened.append(await asyncio.wait_for(_connect(server.url, alice), 10))
            # One more connection is refused (tried in a subprocess: nats-py leaks a socket on refusal).
            assert "maximum account active connections" in _connect_elsewhere(server.url, alice)
            # The limit is alice's alone: another tenant still connects.
            assert _connect_elsewhere(server.url, server.options("deployer")).strip() == "connected"
        finally:
            for c in opened:
                await c.close()
            await nc.close()


async def test_tenants_named_like_config_keywords_are_accounts_of_their_own(tmp_path: Path) -> None:
    """Tenant names go unquoted into tenants.conf as account names: names that are words of nats-server's config
    language (`include`, `accounts`, `users`, `jetstream`...) or one letter (`t`, the subject prefix's own token)
    must still be plain accounts, each reaching the platform on its own subject only (the defence holds)."""
    tricky = ["include", "accounts", "users", "jetstream", "t", "system", "a-b"]
    with accounts_server(tmp_path / "data", tricky) as server:
        cp_login = server.secrets.service_login("controlplane")
        cp = await _connect(server.url, {"user": cp_login.user, "password": cp_login.password})

        async def answer(msg: nats.aio.msg.Msg) -> None:
            await msg.respond(msg.subject.encode())

        await cp.subscribe(tenancy.tenant_subject("*", names.SUBJECT_LIST), cb=answer)
        await cp.flush()
        try:
            for tenant in tricky:
                nc = await _connect(server.url, server.options(tenant))
                try:
                    reply = await nc.request(names.SUBJECT_LIST, b"{}", timeout=5)
                    assert reply.data.decode() == tenancy.tenant_subject(tenant, names.SUBJECT_LIST)
                    assert tenancy.tenant_of(reply.data.decode()) == tenant
                finally:
                    await nc.close()
        finally:
            await cp.close()


def test_the_tenant_list_and_credentials_stay_private(tmp_path: Path) -> None:
    """The files holding passwords or hashes are 0600 whoever's umask (the defence holds)."""
    old = os.umask(0)
    try:
        data = tmp_path / "data"
        credentials.platform_secrets(data)
        credentials.ensure_default_tenant(data, data / "credentials.env")
        _, path = credentials.add_tenant(data, "carol")
        for private in (data / "platform.env", data / "credentials.env", data / credentials.TENANT_LIST_FILE, path):
            assert oct(private.stat().st_mode & 0o777) == "0o600", private
    finally:
        os.umask(old)


# Never ready: each upload holds the control plane until its health timeout.
HANGING_FN = "import time\n\ntime.sleep(600)\n\n\nasync def fn(message):\n    return message\n"


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_one_tenant_cannot_flood_the_control_plane_with_requests(platform_on, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Every request ran in a task of its own, without bound: one tenant could keep any number of uploads (each up
    to the 8 MB max payload, held in memory while it waits) and builds going at once. Measured before the fix:
    12 concurrent uploads from one tenant started 12 builds and 12 instances together. Now a tenant has at most
    `tenant_max_requests` requests in flight; the rest are refused at once with `too_many_requests`, and other
    tenants are served as usual."""
    with accounts_server(tmp_path / "data", ["alice"]) as server:
        platform = platform_on(server.url)
        await platform.start_controlplane(**server.service_env("controlplane"), AUBE_HEALTH_TIMEOUT="8")
        alice = await _connect(server.url, server.options("alice"))
        bob = await _connect(server.url, server.options("deployer"))
        try:

            async def upload(i: int) -> tuple[float, dict[str, object]]:
                bundle = zip_base64(REPO / "examples" / "reverse-async", {"fn.py": HANGING_FN})
                body = {"name": f"flood{i}", "zip": bundle}
                started = time.monotonic()
                reply = await alice.request(names.SUBJECT_UPLOAD, json.dumps(body).encode(), timeout=120)
                return time.monotonic() - started, json.loads(reply.data)

            tasks = [asyncio.ensure_future(upload(i)) for i in range(12)]
            await asyncio.sleep(1.0)
            # Meanwhile another tenant is answered at once.
            started = time.monotonic()
            listed = json.loads((await bob.request(names.SUBJECT_LIST, b"{}", timeout=10)).data)
            assert listed["ok"] is True and time.monotonic() - started < 3
            results = await asyncio.gather(*tasks)
            codes = sorted(str(r["error"]["code"]) for _, r in results)  # type: ignore[index]
            limit = 4  # the default AUBE_TENANT_MAX_REQUESTS
            assert codes == ["health_check_failed"] * limit + ["too_many_requests"] * (12 - limit), codes
            refused = [t for t, r in results if r["error"]["code"] == "too_many_requests"]  # type: ignore[index]
            assert max(refused) < 5, refused  # at once, not after the others' builds
            # The places are given back: alice is served again.
            again = json.loads((await alice.request(names.SUBJECT_LIST, b"{}", timeout=10)).data)
            assert again["ok"] is True
        finally:
            await alice.close()
            await bob.close()
            platform.stop_all()


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_without_the_fetch_password_a_tenants_object_key_never_reads_the_platforms_store(  # type: ignore[no-untyped-def]
    platform_on, tmp_path: Path
) -> None:
    """A control plane on a server with accounts but started without AUBE_NATS_FETCH_PASSWORD read a tenant's
    `object` upload from the platform account's own bundle store: a tenant naming the key of a bundle the operator
    was uploading deployed the operator's code as its own function (and deleted the operator's copy). Now such a
    tenant request is refused; the operator's own object uploads work as before."""
    with accounts_server(tmp_path / "data", ["alice"]) as server:
        platform = platform_on(server.url)
        env = server.service_env("controlplane")
        del env["AUBE_NATS_FETCH_PASSWORD"]
        await platform.start_controlplane(**env)
        cp_login = server.secrets.service_login("controlplane")
        operator = await _connect(server.url, {"user": cp_login.user, "password": cp_login.password})
        alice = await _connect(server.url, server.options("alice"))
        try:
            store = await operator.jetstream().object_store(names.BUCKET_BUNDLES)
            operator_bundle = base64.b64decode(zip_base64(REPO / "examples" / "reverse-async"))
            await store.put("operator-bundle", operator_bundle)
            body = {"name": "stolen", "object": "operator-bundle"}
            reply = json.loads((await alice.request(names.SUBJECT_UPLOAD, json.dumps(body).encode(), timeout=120)).data)
            assert reply["ok"] is False and reply["error"]["code"] == "invalid_request", reply
            assert (await store.get("operator-bundle")).data == operator_bundle  # untouched
            # The operator's own object upload still reads its store.
            body = {"name": "mine", "object": "operator-bundle"}
            reply = json.loads(
                (await operator.request(names.SUBJECT_UPLOAD, json.dumps(body).encode(), timeout=120)).data
            )
            assert reply["ok"] is True, reply
        finally:
            await alice.close()
            await operator.close()
            platform.stop_all()


BOBS_FN = (
    "async def fn(websocket):\n    async for message in websocket:\n        await websocket.send('bob:' + message)\n"
)


async def _until_closed(ws: Any) -> None:
    """Keep talking on a WebSocket until the other side ends it."""
    from websockets.exceptions import ConnectionClosed

    try:
        while True:
            await ws.send("x")
            await ws.recv()
            await asyncio.sleep(0.2)
    except ConnectionClosed:
        return


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_a_name_taken_over_during_delete_grace_gets_no_old_stream_and_ends_the_grace_on_time(  # type: ignore[no-untyped-def]
    platform_on, tmp_path: Path
) -> None:
    """Alice deletes a function while a stream is open on it (grace 3 s); during the grace, Bob uploads the same
    name (free: it is being deleted). Bob's clients must reach Bob's code only, never Alice's still-streaming
    instance (the defence holds), and Alice's stream must still end when her grace ends. Before the fixes:
    Bob's upload failed with `conflict` when a scale-out of Alice's function, cut short by her delete, cleaned up
    its slot after Bob had started his instance there (it deleted Bob's registry entry); and Bob's upload retired
    Alice's instance again without a deadline, so her deleted function kept streaming for ever."""
    from websockets.asyncio.client import connect

    with accounts_server(tmp_path / "data", ["alice"]) as server:
        platform = platform_on(server.url)
        await platform.start_controlplane(**server.service_env("controlplane"))
        port = free_port()
        proxy_env = server.service_env("proxy")
        platform.start("aube.proxy", AUBE_PROXY_PORT=str(port), AUBE_PROXY_HOST="127.0.0.1", **proxy_env)
        alice = await _connect(server.url, server.options("alice"))
        bob = await _connect(server.url, server.options("deployer"))
        url = f"ws://127.0.0.1:{port}/shared"
        try:
            body = {"name": "shared", "zip": zip_base64(REPO / "examples" / "reverse-async")}
            reply = json.loads((await alice.request(names.SUBJECT_UPLOAD, json.dumps(body).encode(), timeout=120)).data)
            assert reply["ok"] is True, reply
            deadline = time.monotonic() + 30
            while True:  # the proxy may still be starting
                try:
                    held = await connect(url, proxy=None, open_timeout=5)
                    break
                except OSError:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.3)
            await held.send("abc")
            assert await held.recv() == "cba"
            deleted = json.loads(
                (await alice.request(names.SUBJECT_DELETE, b'{"name": "shared", "grace": 3}', timeout=60)).data
            )
            assert deleted["ok"] is True and deleted["draining"] == 1, deleted
            ended_by = time.monotonic() + 3

            body = {"name": "shared", "zip": zip_base64(REPO / "examples" / "reverse-async", {"fn.py": BOBS_FN})}
            reply = json.loads((await bob.request(names.SUBJECT_UPLOAD, json.dumps(body).encode(), timeout=120)).data)
            assert reply["ok"] is True and reply["version"] == 2, reply
            async with connect(url, proxy=None, open_timeout=10) as ws:
                await ws.send("abc")
                assert await ws.recv() == "bob:abc"  # Bob's code, not Alice's instance
            await held.send("still")
            assert await held.recv() == "llits"  # Alice's stream is not cut early either

            # Alice's stream ends when her grace ends (retirement runs every second), not never.
            with anyio.fail_after(ended_by - time.monotonic() + 8):
                await _until_closed(held)
            listed = json.loads((await bob.request(names.SUBJECT_LIST, b"{}", timeout=10)).data)
            assert [(f["name"], f["version"]) for f in listed["functions"]] == [("shared", 2)]
            assert json.loads((await alice.request(names.SUBJECT_LIST, b"{}", timeout=10)).data)["functions"] == []
        finally:
            await alice.close()
            await bob.close()
            platform.stop_all()


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_two_tenants_uploading_one_new_name_at_once_leave_one_owner_and_nothing_of_the_loser(  # type: ignore[no-untyped-def]
    platform_on, tmp_path: Path
) -> None:
    """Alice and Bob race for a new name: exactly one wins, the record is the winner's, the loser gets name_taken
    and none of its instances stays behind (the defence holds: uploads of one name are serialized and the
    ownership is checked again inside)."""
    with accounts_server(tmp_path / "data", ["alice"]) as server:
        platform = platform_on(server.url)
        await platform.start_controlplane(**server.service_env("controlplane"))
        clients = {
            "alice": await _connect(server.url, server.options("alice")),
            "deployer": await _connect(server.url, server.options("deployer")),
        }
        cp_login = server.secrets.service_login("controlplane")
        operator = await _connect(server.url, {"user": cp_login.user, "password": cp_login.password})
        try:

            async def upload(tenant: str) -> dict[str, Any]:
                body = {"name": "race", "zip": zip_base64(REPO / "examples" / "reverse-async")}
                data = json.dumps(body).encode()
                return json.loads((await clients[tenant].request(names.SUBJECT_UPLOAD, data, timeout=120)).data)  # type: ignore[no-any-return]

            replies = dict(zip(clients, await asyncio.gather(*(upload(t) for t in clients)), strict=True))
            winners = [t for t, r in replies.items() if r["ok"]]
            assert len(winners) == 1, replies
            (loser,) = set(clients) - set(winners)
            assert replies[loser]["error"]["code"] == "name_taken", replies
            registry = await Registry.open(operator.jetstream())
            entry = await registry.get_function("race")
            assert entry is not None and entry.record.tenant == winners[0]
            instances = await registry.instances("race")
            assert [e.record.version for e in instances] == [entry.record.version]
            listed = json.loads((await clients[loser].request(names.SUBJECT_LIST, b"{}", timeout=10)).data)
            assert listed["functions"] == []
        finally:
            for nc in (*clients.values(), operator):
                await nc.close()
            platform.stop_all()


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_a_name_another_control_plane_gave_a_tenant_meanwhile_is_not_deployed_as_that_tenants(
    nats_server, test_owner: str, tmp_path: Path, runtime_kind: str
) -> None:  # type: ignore[no-untyped-def]
    """With two control planes (a queue group shares the requests), Bob's upload of a new name checks the name,
    then validates and builds; meanwhile the other control plane may finish Alice's upload of that name. The
    deploy then saw Alice's record and, taking it for a re-upload, kept its owner: Bob's code went live as the
    next version of Alice's function, serving Alice's clients. Two processes cannot be made to hit that window
    on demand, so this test plays the other control plane: it writes Alice's record into the real registry just
    before Bob's deploy step runs on a real control plane object (real NATS, real process runtime)."""
    import zipfile

    from aube.controlplane.bundle import validate_bundle
    from aube.controlplane.core import ControlPlane
    from aube.controlplane.runtimes.process import ProcessRuntime
    from aube.shared.errors import NameTaken
    from aube.shared.schemas import FunctionRecord, Manifest
    from aube.shared.settings import ControlPlaneSettings

    settings = ControlPlaneSettings(
        nats_url=nats_server.url, owner=test_owner, runtime="process", data_dir=str(tmp_path / "data")
    )
    runtime = ProcessRuntime(settings)
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        registry = await Registry.open(js)
        cp = ControlPlane(settings, nc, registry, runtime, await js.create_object_store(names.BUCKET_BUNDLES))
        data = base64.b64decode(zip_base64(REPO / "examples" / "reverse-async", {"fn.py": BOBS_FN}))
        assert zipfile.is_zipfile(io.BytesIO(data))
        root, manifest = validate_bundle(data, tmp_path / "bundle", cp.limits)
        # The other control plane's work, done while Bob's bundle was being validated.
        now = time.time()
        alices = FunctionRecord(
            name="taken", version=1, manifest=Manifest(), artifact="elsewhere", runtime="process",
            created_at=now, updated_at=now, tenant="alice",
        )  # fmt: skip
        assert await registry.put_function(alices, None) is not None
        try:
            with pytest.raises(NameTaken):
                await cp.uploads._deploy("taken", root, manifest, "deployer")
            entry = await registry.get_function("taken")
            assert entry is not None and entry.record == alices  # Alice's function is untouched
            assert await registry.instances("taken") == []
        finally:
            await cp.stop_everything()
    finally:
        await nc.close()
        await runtime.close()


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_hostile_request_bodies_get_bounded_error_replies_and_the_service_keeps_serving(  # type: ignore[no-untyped-def]
    platform_on, tmp_path: Path
) -> None:
    """Malformed, huge, wildcard-laden or wrongly typed bodies on each tenant subject: each gets an error reply
    with a code, at most a few KiB however big the body, and the control plane keeps serving (the defence holds)."""
    deep = b"[" * 100_000 + b"]" * 100_000
    huge_zip = json.dumps({"name": "big", "zip": "A" * (7 * 1024 * 1024)}).encode()
    bodies = {
        names.SUBJECT_UPLOAD: [
            b"", b"not json", b"\xff\xfe", deep, b"[]", b'{"name": 1}', b'{"name": "*"}', b'{"name": ">"}',
            b'{"name": "a.b"}', b'{"name": "aube.t.alice.fn.upload"}', b'{"name": "x", "zip": "%%%"}',
            b'{"name": "x", "zip": "UEsDBA==", "object": "k"}', b'{"name": "x", "object": "../../etc/passwd"}',
            b'{"name": "x", "object": "*"}', b'{"name": "x", "object": ">"}', huge_zip,
        ],
        names.SUBJECT_DELETE: [
            b'{"name": ">"}', b'{"name": "x", "grace": -1e308}', b'{"name": "x", "grace": "1"}', deep,
        ],
        names.SUBJECT_LIST: [b'{"name": "*"}', b'{"name": ">"}', b'{"name": 5}', deep],
    }  # fmt: skip
    with accounts_server(tmp_path / "data", ["alice"]) as server:
        platform = platform_on(server.url)
        service = await platform.start_controlplane(**server.service_env("controlplane"))
        alice = await _connect(server.url, server.options("alice"))
        try:
            for subject, cases in bodies.items():
                for body in cases:
                    reply = await alice.request(subject, body, timeout=60)
                    decoded = json.loads(reply.data)
                    assert len(reply.data) < 8192, (subject, body[:60], len(reply.data))
                    if subject == names.SUBJECT_LIST and decoded["ok"]:
                        assert decoded["functions"] == []  # a wildcard is a name like any other: nothing matches
                        continue
                    assert decoded["ok"] is False and decoded["error"]["code"], (subject, body[:60], decoded)
            assert service.proc is not None and service.proc.poll() is None
            listed = json.loads((await alice.request(names.SUBJECT_LIST, b"{}", timeout=10)).data)
            assert listed == {"ok": True, "functions": []}
        finally:
            await alice.close()
            platform.stop_all()


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_a_tenant_neither_reads_nor_feeds_the_control_planes_fetch_connection(  # type: ignore[no-untyped-def]
    platform_on, tmp_path: Path
) -> None:
    """The control plane reads a big bundle from the tenant's own account as `aube-fetch-<tenant>`, whose replies
    and push-consumer deliveries came to `_INBOX.…` subjects of that account, which the tenant may subscribe
    and publish to: it saw the fetch connection's replies and could publish into its consumer's delivery
    subject (made-up chunks, e.g. without end, for a read that keeps everything in memory). Now the fetch
    connection's inboxes have a prefix of their own that tenant users may neither subscribe nor publish to."""
    from aube.cli.main import deploy

    with accounts_server(tmp_path / "data", ["alice"]) as server:
        platform = platform_on(server.url)
        await platform.start_controlplane(**server.service_env("controlplane"))
        errors: list[str] = []

        async def on_error(e: Exception) -> None:
            errors.append(str(e))

        alice = await nats.connect(server.url, **server.options("alice"), error_cb=on_error)
        seen: list[tuple[str, str, int]] = []

        async def spy(msg: nats.aio.msg.Msg) -> None:
            seen.append((msg.subject, msg.reply, len(msg.data)))

        try:
            await alice.subscribe(">", cb=spy)
            await alice.subscribe(f"{tenancy.FETCH_INBOX_PREFIX}.>", cb=spy)
            await alice.publish(f"{tenancy.FETCH_INBOX_PREFIX}.x.y", b"forged chunk")
            big = tmp_path / "big"
            big.mkdir()
            (big / "fn.py").write_text((REPO / "examples" / "reverse-async" / "fn.py").read_text())
            (big / "payload.bin").write_bytes(os.urandom(9 * 1024 * 1024))
            reply = await deploy(alice, big, "big", 120)
            assert reply.name == "big"
            await alice.flush()
            await asyncio.sleep(0.5)
            # Alice's own upload publishes its chunks (seen on $O.…) and gets small acks on its inbox; the
            # fetch connection's 128 KiB chunk deliveries are not hers to see.
            # No reply to the fetch connection's inboxes reaches Alice's `>` (only her own inbox's). She does still
            # see its consumer's deliveries of her own chunks (they carry the stream subject, $O.…): her own data.
            own_inbox = alice._inbox_prefix.decode() + "."
            assert [s for s, _, _ in seen if s.startswith("_") and not s.startswith(own_inbox)] == []
            assert sum("permissions violation" in e.lower() for e in errors) == 2, errors
        finally:
            await alice.close()
            platform.stop_all()


def test_tenant_add_refuses_a_tenant_whose_storage_quota_the_server_cannot_reserve(tmp_path: Path) -> None:
    """nats-server reserves each tenant account's storage quota (512 MB) from its max_file_store (4 GB in
    deploy/nats.conf) and, when they do not fit, refuses to start JetStream at all ("insufficient storage
    resources"): the ninth tenant made the next start of the whole platform fail. `aube tenant add` now refuses
    the tenant that would not fit, and says why."""
    fits = tenancy.tenants_that_fit(CONF.read_text())
    assert fits == 8
    for i in range(fits - 1):  # the default tenant is the first
        _, reloaded = add_tenant(f"t{i}", nats_conf=CONF, workdir=tmp_path)
        assert reloaded is False
    with pytest.raises(InvalidRequest, match="max_file_store"):
        add_tenant("one-too-many", nats_conf=CONF, workdir=tmp_path)
    assert not (tmp_path / ".data" / "tenants" / "one-too-many.env").exists()
    # The tenants that fit (with the default one, which the first `aube start` adds) start: the real server on the
    # real configuration.
    data = tmp_path / ".data"
    credentials.ensure_default_tenant(data, data / "credentials.env")
    hashes = json.loads((data / credentials.TENANT_LIST_FILE).read_text())
    assert len(hashes) == fits
    secrets = credentials.platform_secrets(data)
    with LocalNatsServer(config=CONF, env=secrets.environment(), tenant_hashes=hashes):
        pass


async def test_a_leaked_tenant_password_can_be_rotated_and_stops_working_at_once(tmp_path: Path) -> None:
    """Someone got alice's password. The operator had no way to change it (`aube tenant add` refuses an existing
    tenant; only hand-editing tenants.json). `aube tenant rotate alice` gives her a new one: after the reload the
    old one is refused and connections made with it are closed. The server runs as `aube start` runs it: from the
    working directory, on <data>/nats/conf, with its pid file."""
    from aube.cli.platform import rotate_tenant, write_tenant_config
    from aube.shared.natsserver import find_nats_server

    data = tmp_path / ".data"
    secrets = credentials.platform_secrets(data)
    credentials.ensure_default_tenant(data, data / "credentials.env")
    credentials.add_tenant(data, "alice")
    old = credentials.load_login(data / "tenants" / "alice.env")
    assert old is not None
    conf = write_tenant_config(CONF, data)
    port, monitor = free_port(), free_port()
    argv = [find_nats_server(), "-c", str(conf), "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor)]
    log = (tmp_path / "nats.log").open("wb")
    server = subprocess.Popen(
        argv, cwd=tmp_path, env={**os.environ, **secrets.environment()}, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"nats://127.0.0.1:{port}"
    try:
        with anyio.fail_after(20):
            while not (data / "nats" / "nats-server.pid").exists() or "connected" not in _connect_elsewhere(
                url, {"user": "alice", "password": old.password}
            ):
                await asyncio.sleep(0.2)
        closed = asyncio.Event()

        async def on_closed() -> None:
            closed.set()

        thief = await nats.connect(
            url, user="alice", password=old.password, allow_reconnect=False, closed_cb=on_closed
        )  # fmt: skip
        assert thief.is_connected
        path, reloaded = rotate_tenant("alice", nats_conf=CONF, workdir=tmp_path)
        assert reloaded is True and path == data / "tenants" / "alice.env"
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        new = credentials.load_login(path)
        assert new is not None and new.password != old.password
        with anyio.fail_after(10):
            await closed.wait()  # the thief's connection is gone
        assert "Authorization Violation" in _connect_elsewhere(url, {"user": "alice", "password": old.password})
        assert _connect_elsewhere(url, {"user": "alice", "password": new.password}).strip() == "connected"
        # The default tenant too (its file is credentials.env, which the next start keeps as it is).
        path, _ = rotate_tenant("deployer", nats_conf=CONF, workdir=tmp_path)
        assert path == data / "credentials.env"
        assert credentials.ensure_default_tenant(data, path) == credentials.load_login(path)
        with pytest.raises(InvalidRequest, match="no tenant"):
            rotate_tenant("nobody", nats_conf=CONF, workdir=tmp_path)
    finally:
        server.terminate()
        server.wait(10)
        log.close()


@pytest.mark.parametrize("stored", ["", "hunter2", "$2b$10$short", '$2b$10$"quoted"'])
def test_a_tenant_list_entry_that_is_no_bcrypt_hash_never_becomes_a_login(tmp_path: Path, stored: str) -> None:
    """tenants.json maps each tenant to a bcrypt hash, rendered as the account user's password. nats-server takes
    any other string as a plain password, and an empty one as none: a hand-edited or damaged entry `""` let anyone
    log in as that tenant with an empty password (measured on the real server). Such a list is now refused
    before any configuration is written."""
    data = tmp_path / "data"
    credentials.ensure_default_tenant(data, data / "credentials.env")
    hashes = {**json.loads((data / credentials.TENANT_LIST_FILE).read_text()), "alice": stored}
    with pytest.raises(InvalidRequest, match="alice: the stored password hash is malformed"):
        write_run_config(CONF, tmp_path / "conf", hashes)
    assert not (tmp_path / "conf" / ACCOUNTS_FILE).exists()


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_the_new_owner_of_a_name_gets_no_event_about_the_old_owners_instances(  # type: ignore[no-untyped-def]
    platform_on, tmp_path: Path
) -> None:
    """After Bob took over a name Alice deleted, Alice's last stream ended and the proxy had her instance stopped:
    the `stopped` event (with her instance id and the stop reason) went to the name's current owner, Bob. Events
    about instances started before the current owner's function existed now go to nobody's tenant."""
    from websockets.asyncio.client import connect

    with accounts_server(tmp_path / "data", ["alice"]) as server:
        platform = platform_on(server.url)
        await platform.start_controlplane(**server.service_env("controlplane"))
        port = free_port()
        proxy_env = server.service_env("proxy")
        platform.start("aube.proxy", AUBE_PROXY_PORT=str(port), AUBE_PROXY_HOST="127.0.0.1", **proxy_env)
        alice = await _connect(server.url, server.options("alice"))
        bob = await _connect(server.url, server.options("deployer"))
        cp_login = server.secrets.service_login("controlplane")
        operator = await _connect(server.url, {"user": cp_login.user, "password": cp_login.password})
        try:
            body = {"name": "shared", "zip": zip_base64(REPO / "examples" / "reverse-async")}
            reply = json.loads((await alice.request(names.SUBJECT_UPLOAD, json.dumps(body).encode(), timeout=120)).data)
            assert reply["ok"] is True, reply
            deadline = time.monotonic() + 30
            while True:
                try:
                    held = await connect(f"ws://127.0.0.1:{port}/shared", proxy=None, open_timeout=5)
                    break
                except OSError:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.3)
            await held.send("abc")
            assert await held.recv() == "cba"
            registry = await Registry.open(operator.jetstream())
            alices_ids = {e.record.instance_id for e in await registry.instances("shared")}
            deleted = json.loads(
                (await alice.request(names.SUBJECT_DELETE, b'{"name": "shared", "grace": 60}', timeout=60)).data
            )
            assert deleted["draining"] == 1, deleted
            body = {"name": "shared", "zip": zip_base64(REPO / "examples" / "reverse-async", {"fn.py": BOBS_FN})}
            reply = json.loads((await bob.request(names.SUBJECT_UPLOAD, json.dumps(body).encode(), timeout=120)).data)
            assert reply["ok"] is True, reply
            bobs_events = await bob.subscribe(names.events_subject("shared"))
            await held.close()  # Alice's last stream ends: the proxy asks for her instance to be stopped
            with anyio.fail_after(30):
                while alices_ids & {e.record.instance_id for e in await registry.instances("shared")}:
                    await asyncio.sleep(0.2)
            await asyncio.sleep(0.5)
            seen = []
            while True:
                try:
                    seen.append((await bobs_events.next_msg(timeout=0.3)).data.decode())
                except nats.errors.TimeoutError:
                    break
            assert [m for m in seen if any(i in m for i in alices_ids)] == []
        finally:
            for nc in (alice, bob, operator):
                await nc.close()
            platform.stop_all()


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_a_tenant_has_a_bounded_number_of_functions(platform_on, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Nothing bounded how many functions one tenant deploys, each a prepared version of up to 256 MB extracted on
    the control plane's disk (or an image), a registry record, and by default a warm instance: one tenant could
    fill the host for everyone. Now a tenant has at most `AUBE_TENANT_MAX_FUNCTIONS` (here 2); more new names
    get `quota_exceeded`, re-uploads of its own names still work, and other tenants are not affected."""
    with accounts_server(tmp_path / "data", ["alice"]) as server:
        platform = platform_on(server.url)
        env = server.service_env("controlplane")
        await platform.start_controlplane(**env, AUBE_TENANT_MAX_FUNCTIONS="2")
        alice = await _connect(server.url, server.options("alice"))
        bob = await _connect(server.url, server.options("deployer"))

        async def upload(nc: NATS, name: str) -> dict[str, Any]:
            body = {"name": name, "zip": zip_base64(REPO / "examples" / "reverse-async")}
            reply = await nc.request(names.SUBJECT_UPLOAD, json.dumps(body).encode(), timeout=120)
            return json.loads(reply.data)  # type: ignore[no-any-return]

        try:
            assert (await upload(alice, "f1"))["ok"] and (await upload(alice, "f2"))["ok"]
            refused = await upload(alice, "f3")
            assert refused["ok"] is False and refused["error"]["code"] == "quota_exceeded", refused
            assert (await upload(alice, "f1"))["version"] == 2  # her own names: re-uploads
            assert (await upload(bob, "b1"))["ok"]  # the quota is alice's alone
            deleted = json.loads((await alice.request(names.SUBJECT_DELETE, b'{"name": "f2"}', timeout=60)).data)
            assert deleted["ok"] is True, deleted
            assert (await upload(alice, "f3"))["ok"]  # a deleted function frees its place
        finally:
            await alice.close()
            await bob.close()
            platform.stop_all()
