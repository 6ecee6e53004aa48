"""Helpers the integration tests share (fixtures live in conftest.py; these are plain functions)."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import nats
from nats.aio.client import Client as NATS

from aube.shared import credentials
from aube.shared.natsserver import LocalNatsServer
from aube.shared.registry import Registry

REPO = Path(__file__).resolve().parent.parent


def zip_base64(folder: Path, extra: Mapping[str, str] | None = None) -> str:
    """The folder as AubeFaaS's upload script sent it: a base64 zip with the files at the archive root.
    `extra` files are added, replacing any of the same name."""
    extra = extra or {}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.name not in extra:
                z.write(path, str(path.relative_to(folder)))
        for name, text in extra.items():
            z.writestr(name, text)
    return base64.b64encode(buf.getvalue()).decode()


@asynccontextmanager
async def nats_client(url: str) -> AsyncIterator[tuple[NATS, Registry]]:
    nc = await nats.connect(url)
    try:
        yield nc, await Registry.open(nc.jetstream())
    finally:
        await nc.close()


class AccountsServer:
    """A nats-server on the real deploy/nats.conf (accounts: the platform's, `deployer`'s and any other tenant's)."""

    def __init__(self, server: LocalNatsServer, secrets: credentials.PlatformSecrets, data: Path) -> None:
        self.server = server
        self.secrets = secrets
        self.data = data

    @property
    def url(self) -> str:
        return self.server.url

    def login(self, tenant: str) -> credentials.Login:
        path = self.data / ("credentials.env" if tenant == "deployer" else f"tenants/{tenant}.env")
        login = credentials.load_login(path)
        assert login is not None
        return login

    def options(self, tenant: str) -> dict[str, str]:
        """nats.connect keyword arguments for `tenant`."""
        login = self.login(tenant)
        return {"user": login.user, "password": login.password}

    def service_env(self, service: str) -> dict[str, str]:
        """The AUBE_* variables a service process needs to log in as itself."""
        login = self.secrets.service_login(service)
        env = {"AUBE_NATS_USER": login.user, "AUBE_NATS_PASSWORD": login.password}
        if service == "controlplane":
            env["AUBE_NATS_FETCH_PASSWORD"] = self.secrets.fetch_password
        return env

    def all_passwords(self) -> list[str]:
        return [*self.secrets.passwords.values(), self.login("deployer").password]


@contextmanager
def accounts_server(data: Path, tenants: Sequence[str] = ()) -> Iterator[AccountsServer]:
    secrets = credentials.platform_secrets(data)
    credentials.ensure_default_tenant(data, data / "credentials.env")
    for tenant in tenants:
        credentials.add_tenant(data, tenant)
    hashes = json.loads((data / credentials.TENANT_LIST_FILE).read_text())
    with LocalNatsServer(config=REPO / "deploy" / "nats.conf", env=secrets.environment(), tenant_hashes=hashes) as s:
        yield AccountsServer(s, secrets, data)
