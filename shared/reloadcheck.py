"""Reload nats-server's configuration until every tenant's service imports reach the platform account.

Measured with nats-server 2.15.1 on deploy/nats.conf: after the SIGHUP that adds a tenant's account, the server logs
"Reloaded: accounts", the account and its imports show in /accountz, yet a request on the tenant's `aube.fn.list`
finds no subscriber in the platform account (no responders) whoever subscribes there, old connections and new
alike. The next reload (the same configuration) repairs it. So a reload is checked, not trusted: each tenant's
import is probed from inside that tenant's account, and the server reloaded again until every probe arrives.

The probe: the platform's fetch user of each tenant account (`aube-fetch-<tenant>`, the platform's password)
publishes on the tenant's `aube.fn.list` without a reply subject, and a plain subscription in the platform account
on `aube.t.<tenant>.fn.list` must see it. The control plane's queue group gets it too and lists that tenant's
functions for nobody (read-only; a request without a reply subject is answered to no one).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from aube.shared import tenants as tenancy
from aube.shared.credentials import Login, PlatformSecrets

PROBE_SUBJECT = tenancy.RELOAD_PROBE_SUBJECT
PROBE_HEADER = "Aube-Reload-Probe"
PROBE_WAIT_SECONDS = 2.0  # how long a probe may take to arrive before its tenant's import counts as broken
RELOAD_ATTEMPTS = 5
RELOAD_SETTLE_SECONDS = 0.3  # the reload of a few tenants takes 0.1-0.5 s; probes retried within PROBE_WAIT_SECONDS


def listening_ports(proc_net_tcp: str, inodes: set[str]) -> list[tuple[str, int]]:
    """The (IPv4 address, port) of each listening socket in /proc/<pid>/net/tcp's text whose inode is in `inodes`
    (the process's own sockets). Pure."""
    found = []
    for line in proc_net_tcp.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
            continue
        address, port = fields[1].split(":")
        octets = bytes.fromhex(address)[::-1]  # little-endian on the architectures Aube runs on
        found.append((".".join(str(o) for o in octets), int(port, 16)))
    return found


def client_url(pid: int) -> str | None:
    """Where nats-server `pid` takes clients: of its listening IPv4 sockets, the one that greets with INFO (its
    monitoring and cluster ports do not); None when none does. Found from the process itself, since its ports
    may come from flags (`-p`) or a configuration other than the one the caller knows."""
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        links = [os.readlink(fd_dir / fd) for fd in os.listdir(fd_dir)]
        table = Path(f"/proc/{pid}/net/tcp").read_text()
    except OSError:
        return None
    inodes = {link[len("socket:[") : -1] for link in links if link.startswith("socket:[")}
    for host, port in listening_ports(table, inodes):
        host = "127.0.0.1" if host == "0.0.0.0" else host
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                if s.recv(4) == b"INFO":
                    return f"nats://{host}:{port}"
        except OSError:
            continue
    return None


async def _connect(url: str, user: str, password: str) -> NATS:
    return await nats.connect(
        url, user=user, password=password, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5
    )  # fmt: skip


async def unreachable_tenants(url: str, platform: Login, fetch_password: str, tenants: Iterable[str]) -> list[str]:
    """The tenants among `tenants` whose `aube.fn.list` does not reach the platform account on the server at
    `url`. `platform` is any platform-account login that may subscribe to `aube.t.>` (the control plane's)."""
    wanted = sorted(set(tenants))
    seen: set[str] = set()
    receiver = await _connect(url, platform.user, platform.password)
    try:

        async def arrived(msg: Msg) -> None:
            seen.add(tenancy.tenant_of(msg.subject))

        await receiver.subscribe(tenancy.tenant_subject("*", PROBE_SUBJECT), cb=arrived)
        await receiver.flush()
        senders = {t: await _connect(url, tenancy.FETCH_USER_PREFIX + t, fetch_password) for t in wanted}
        try:
            with anyio.move_on_after(PROBE_WAIT_SECONDS):
                while missing := [t for t in wanted if t not in seen]:
                    for tenant in missing:  # again until it arrives: a reload still under way may be finishing
                        await senders[tenant].publish(PROBE_SUBJECT, b"{}", headers={PROBE_HEADER: "1"})
                        await senders[tenant].flush()
                    await anyio.sleep(0.1)
        finally:
            for sender in senders.values():
                await sender.close()
    finally:
        await receiver.close()
    return [t for t in wanted if t not in seen]


def reload_until_reachable(
    pid: int, url: str, secrets: PlatformSecrets, tenants: Iterable[str], attempts: int = RELOAD_ATTEMPTS
) -> list[str]:
    """SIGHUP nats-server at `pid`, then again while a tenant's imports do not reach the platform account; the
    tenants still unreachable after `attempts` reloads (empty: all reached). A server at `url` that refuses the
    probes' logins (an old configuration still loaded) counts as a reload to do again."""
    tenants = sorted(set(tenants))
    broken = tenants
    login = secrets.service_login("controlplane")
    # The probes run on an event loop of their own, in a thread: callers may be inside one (tests) or not (the CLI).
    with ThreadPoolExecutor(1) as thread:
        for _ in range(attempts):
            os.kill(pid, signal.SIGHUP)
            time.sleep(RELOAD_SETTLE_SECONDS)
            try:
                probe = thread.submit(anyio.run, unreachable_tenants, url, login, secrets.fetch_password, tenants)
                broken = probe.result()
            except (OSError, TimeoutError, nats.errors.Error) as e:
                broken = [f"(the probe failed: {type(e).__name__}: {e})"]
            if not broken:
                return []
    return broken
