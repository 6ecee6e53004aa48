"""NATS identities of a platform: one password per service, one per tenant, and where each is kept.

    <data>/platform.env      the services' passwords (controlplane, proxy, reaper, fetch), mode 0600. nats-server
                             reads them from its environment (deploy/nats.conf names them); each service gets only
                             its own, as AUBE_NATS_USER / AUBE_NATS_PASSWORD.
    <data>/credentials.env   the default tenant's credentials (user `deployer`), mode 0600: what scripts/upload.sh,
                             the aube CLI and the nats CLI use. It holds no platform secret.
    <data>/tenants/<t>.env   another tenant's credentials, written by `aube tenant add <t>` for the operator to hand
                             over. Same form: AUBE_NATS_USER=<t>, AUBE_NATS_DEPLOYER_PASSWORD=<password>.
    <data>/tenants.json      the tenant list: name -> bcrypt hash (the server's tenants.conf is rendered from it).
    <data>/hosts/<id>.env    a host agent's login (`aube host add <id>`), mode 0600: AUBE_HOST_ID, AUBE_NATS_USER,
                             AUBE_NATS_PASSWORD; <data>/hosts.json the host list (aube.shared.agentlogins).

Passwords travel as connect options, never inside a URL (a URL ends up in logs and error messages).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import string
from pathlib import Path

import bcrypt
import msgspec

from aube.shared import agentlogins
from aube.shared import tenants as tenancy

DEPLOYER_USER = tenancy.DEFAULT_TENANT
ENV_USER = "AUBE_NATS_USER"
ENV_PASSWORD = "AUBE_NATS_PASSWORD"
ENV_DEPLOYER_PASSWORD = "AUBE_NATS_DEPLOYER_PASSWORD"
ENV_CREDENTIALS_FILE = "AUBE_CREDENTIALS"  # a file clients must use (aube.cli.credsearch: where else they look)
ENV_NATS_URL = "AUBE_NATS_URL"  # in a credentials file: the servers that know its login (the rig's three nodes)
DEFAULT_CREDENTIALS_FILE = Path(".data") / "credentials.env"
PLATFORM_FILE = "platform.env"
TENANT_LIST_FILE = "tenants.json"
TENANT_CREDENTIALS_DIR = "tenants"
# An earlier version kept the service password in credentials.env, which deployers read: it is dropped from there.
_LEGACY_SERVICE_PASSWORD = "AUBE_NATS_SERVICE_PASSWORD"

# The platform's users in deploy/nats.conf and the environment variable holding each one's password.
SERVICE_USERS = {
    "controlplane": ("aube-controlplane", "AUBE_NATS_CONTROLPLANE_PASSWORD"),
    "proxy": ("aube-proxy", "AUBE_NATS_PROXY_PASSWORD"),
    "reaper": ("aube-reaper", "AUBE_NATS_REAPER_PASSWORD"),
}
# Host agents are not among them: each host has its own user (`host_login`, aube.shared.agentlogins).
ENV_FETCH_PASSWORD = tenancy.ENV_FETCH_PASSWORD

log = logging.getLogger(__name__)

# nats-server parses an environment variable named in its config as a config value, not as a string: a password
# like "-x…" or "12K" stops the server from starting ("variable reference … could not be parsed"). Passwords
# therefore start with a letter and hold only letters and digits (32 characters: about 190 bits).
PASSWORD_LENGTH = 32
SAFE_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9]*")
BCRYPT_COST = 10  # nats-server checks it on every connect: about 50 ms here


def new_password() -> str:
    alphabet = string.ascii_letters + string.digits
    return secrets.choice(string.ascii_letters) + "".join(secrets.choice(alphabet) for _ in range(PASSWORD_LENGTH - 1))


class Login(msgspec.Struct, frozen=True, kw_only=True):
    user: str
    password: str


class PlatformSecrets(msgspec.Struct, frozen=True, kw_only=True):
    """Every password nats-server must know from its environment."""

    passwords: dict[str, str]  # environment variable -> password

    def environment(self) -> dict[str, str]:
        return dict(self.passwords)

    def service_login(self, service: str) -> Login:
        user, env = SERVICE_USERS[service]
        return Login(user=user, password=self.passwords[env])

    @property
    def fetch_password(self) -> str:
        return self.passwords[ENV_FETCH_PASSWORD]


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(staging, path)  # whole or not at all: a reader never sees half a file


write_private = _write_private  # also the compose setup's per-service login files (aube.cli.compose_setup)


def _read_env_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, v in (line.split("=", 1) for line in text.splitlines() if "=" in line)}


def platform_secrets(data_dir: Path) -> PlatformSecrets:
    """Read <data>/platform.env, creating what is missing (or unparseable by nats-server) with fresh passwords."""
    path = data_dir / PLATFORM_FILE
    values = _read_env_file(path)
    wanted = [env for _, env in SERVICE_USERS.values()] + [ENV_FETCH_PASSWORD]
    passwords = {env: values[env] for env in wanted if SAFE_PASSWORD.fullmatch(values.get(env, ""))}
    if len(passwords) != len(wanted):
        passwords = {env: passwords.get(env) or new_password() for env in wanted}
        _write_private(path, "".join(f"{k}={v}\n" for k, v in passwords.items()))
    return PlatformSecrets(passwords=passwords)


def write_login(path: Path, login: Login, *, nats_url: str = "") -> None:
    """A tenant's credentials file (mode 0600), naming its NATS servers too when `nats_url` is given."""
    servers = f"{ENV_NATS_URL}={nats_url}\n" if nats_url else ""
    _write_private(path, f"{ENV_USER}={login.user}\n{ENV_DEPLOYER_PASSWORD}={login.password}\n{servers}")


def load_login(path: Path) -> Login | None:
    """A tenant's credentials file (user `deployer` when the file names none: the form of earlier versions)."""
    values = _read_env_file(path)
    password = values.get(ENV_DEPLOYER_PASSWORD)
    if not password:
        return None
    return Login(user=values.get(ENV_USER) or DEPLOYER_USER, password=password)


def servers_of(path: Path) -> str:
    """The AUBE_NATS_URL a credentials file names ("" if none): the rig's file names its three nodes, so a client
    pointed at it with AUBE_CREDENTIALS alone reaches the rig's servers, not a default one."""
    return _read_env_file(path).get(ENV_NATS_URL, "")


def hash_password(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(BCRYPT_COST)).decode()


def add_tenant(data_dir: Path, tenant: str, credentials_file: Path | None = None) -> tuple[Login, Path]:
    """Create `tenant` with a fresh password: its hash goes to the tenant list, its login to a 0600 file.

    Refuses a tenant that exists (its password would change under its users' feet)."""
    tenant = tenancy.validate_tenant(tenant)
    tenant_list = tenancy.TenantFile(data_dir / TENANT_LIST_FILE)
    known = tenant_list.load()
    if tenant in known:
        from aube.shared.errors import InvalidRequest

        raise InvalidRequest(f"tenant {tenant!r} exists already")
    login = Login(user=tenant, password=new_password())
    path = credentials_file or data_dir / TENANT_CREDENTIALS_DIR / f"{tenant}.env"
    write_login(path, login)
    tenant_list.save({**known, tenant: hash_password(login.password)})
    return login, path


def rotate_tenant(data_dir: Path, tenant: str) -> tuple[Login, Path]:
    """A fresh password for an existing tenant (its hash in the tenant list, its login in its 0600 file): a
    leaked password stops working once the server has reloaded (nats-server then closes its connections)."""
    tenant = tenancy.validate_tenant(tenant)
    tenant_list = tenancy.TenantFile(data_dir / TENANT_LIST_FILE)
    known = tenant_list.load()
    if tenant not in known:
        from aube.shared.errors import InvalidRequest

        raise InvalidRequest(f"no tenant {tenant!r}: `aube tenant add` creates one")
    login = Login(user=tenant, password=new_password())
    # The default tenant's login lives in credentials.env, which `aube start` keeps (and hashes) as it finds it.
    path = data_dir / (
        DEFAULT_CREDENTIALS_FILE.name if tenant == DEPLOYER_USER else f"{TENANT_CREDENTIALS_DIR}/{tenant}.env"
    )
    write_login(path, login)
    tenant_list.save({**known, tenant: hash_password(login.password)})
    return login, path


def _host_paths(data_dir: Path, host_id: str) -> tuple[str, agentlogins.HostFile, Path]:
    host_id = agentlogins.validate_host_id(host_id)
    host_list = agentlogins.HostFile(data_dir / agentlogins.HOST_LIST_FILE)
    return host_id, host_list, data_dir / agentlogins.HOST_CREDENTIALS_DIR / f"{host_id}.env"


def _new_host_login(data_dir: Path, host_id: str) -> tuple[Login, Path]:
    host_id, host_list, path = _host_paths(data_dir, host_id)
    login = Login(user=agentlogins.user(host_id), password=new_password())
    _write_private(
        path, f"{agentlogins.ENV_HOST_ID}={host_id}\n{ENV_USER}={login.user}\n{ENV_PASSWORD}={login.password}\n"
    )
    host_list.save({**host_list.load(), host_id: hash_password(login.password)})
    return login, path


def add_host(data_dir: Path, host_id: str) -> tuple[Login, Path]:
    """`aube host add`: a login for `host_id`'s agent, its hash in the host list and the login in a 0600 file
    (<data>/hosts/<id>.env) for the operator to put on that host. Refuses a host that exists."""
    host_id, host_list, _ = _host_paths(data_dir, host_id)
    if host_id in host_list.load():
        from aube.shared.errors import InvalidRequest

        raise InvalidRequest(f"host {host_id!r} exists already (`aube host rotate {host_id}` gives it a new password)")
    return _new_host_login(data_dir, host_id)


def rotate_host(data_dir: Path, host_id: str) -> tuple[Login, Path]:
    """A new password for a host's agent: the old one stops working once the server has reloaded."""
    host_id, host_list, _ = _host_paths(data_dir, host_id)
    if host_id not in host_list.load():
        from aube.shared.errors import InvalidRequest

        raise InvalidRequest(f"no host {host_id!r}: `aube host add {host_id}` creates its agent's login")
    return _new_host_login(data_dir, host_id)


def ensure_host(data_dir: Path, host_id: str) -> tuple[Login, Path]:
    """The login of `host_id`'s agent as its file holds it, created when missing or not matching the host list
    (the rig's hosts, the tests')."""
    host_id, host_list, path = _host_paths(data_dir, host_id)
    password = _read_env_file(path).get(ENV_PASSWORD, "")
    stored = host_list.load().get(host_id)
    if stored and SAFE_PASSWORD.fullmatch(password) and bcrypt.checkpw(password.encode(), stored.encode()):
        return Login(user=agentlogins.user(host_id), password=password), path
    return _new_host_login(data_dir, host_id)


def host_hashes(data_dir: Path) -> dict[str, str]:
    return agentlogins.HostFile(data_dir / agentlogins.HOST_LIST_FILE).load()


def ensure_default_tenant(data_dir: Path, credentials_file: Path) -> Login:
    """The default tenant `deployer` and its credentials file, created once; an earlier version's file (which also
    held the service password) keeps its deployer password and loses the rest."""
    tenant_list = tenancy.TenantFile(data_dir / TENANT_LIST_FILE)
    known = tenant_list.load()
    login = load_login(credentials_file)
    if login is not None and login.user == DEPLOYER_USER and SAFE_PASSWORD.fullmatch(login.password):
        if _LEGACY_SERVICE_PASSWORD in _read_env_file(credentials_file):
            write_login(credentials_file, login)
        stored = known.get(DEPLOYER_USER)
        if stored is None or not bcrypt.checkpw(login.password.encode(), stored.encode()):
            tenant_list.save({**known, DEPLOYER_USER: hash_password(login.password)})
        return login
    login = Login(user=DEPLOYER_USER, password=new_password())
    write_login(credentials_file, login)
    tenant_list.save({**known, DEPLOYER_USER: hash_password(login.password)})
    return login


def redact(url: str) -> str:
    """A NATS URL setting fit for a log line: one URL or a comma-separated list of them (a cluster), any password in
    them replaced. Each URL on its own: parsed as one, a list hid the passwords after the first, or made the parser
    raise (a port of `4222,nats:`) in the middle of a log call."""
    return ",".join(_redact_one(part) for part in url.split(","))


def _redact_one(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url.strip())
        if not parts.password:
            return url
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    except ValueError:  # not a URL we can take apart: nothing of it goes to the log
        return "<unparsable URL>"
    return urlunsplit(parts._replace(netloc=netloc))
