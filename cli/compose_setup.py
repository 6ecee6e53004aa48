"""The `setup` step of deploy/compose.yaml: the platform's state in the compose data folder, before any service runs.

On the first start it creates what `aube start` creates in .data (the services' NATS passwords in platform.env, the
default tenant `deployer` and its credentials.env); on later starts it keeps them. Every start renders the NATS run
configuration from deploy/nats.conf and the tenant list again, and writes each service's own login into a folder
of its own (`logins/<service>/login.env`), the only part of the data folder that service's container mounts:
a proxy never sees the control plane's password. nats-server itself mounts platform.env, which holds them all.
The proxy and the reaper run as a user that is not root (`--service-user`): their login files are made theirs,
mode 0600, so each reads its own and no other.

Run inside the setup container: `python -m aube.cli.compose_setup --data /srv/aube --nats-url nats://…`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from aube.cli.platform import write_tenant_config
from aube.shared import credentials

LOGINS_DIR = "logins"
LOGIN_FILE = "login.env"
CREDENTIALS_FILE = "credentials.env"
# The services deploy/compose.yaml runs as AUBE_COMPOSE_SERVICE_USER; the control plane stays root (Docker socket,
# iptables, bubblewrap), and so owns its login as whoever runs setup.
UNPRIVILEGED_SERVICES = frozenset({"proxy", "reaper"})


def parse_user(text: str) -> tuple[int, int]:
    """`UID:GID` (numeric, as compose's `user:` takes it here) -> (uid, gid)."""
    uid, sep, gid = text.partition(":")
    if not sep or not uid.isdigit() or not gid.isdigit():
        raise ValueError(f"expected numeric UID:GID, got {text!r}")
    return int(uid), int(gid)


def login_owner(service: str, service_user: tuple[int, int] | None) -> tuple[int, int] | None:
    """Who must own `service`'s login file: the unprivileged user for the proxy and the reaper, else whoever
    writes it (None)."""
    return service_user if service in UNPRIVILEGED_SERVICES else None


def give_to(path: Path, owner: tuple[int, int]) -> None:
    """Make `path` `owner`'s. Only root may give a file away: a setup running as another user succeeds only when
    the services run as that same user."""
    if os.geteuid() == 0:
        os.chown(path, *owner)
    elif os.geteuid() != owner[0]:
        raise SystemExit(
            f"compose setup runs as uid {os.geteuid()} and cannot give {path} to uid {owner[0]}: "
            "set AUBE_COMPOSE_SERVICE_USER to the same user as AUBE_COMPOSE_USER"
        )


def service_environment(secrets: credentials.PlatformSecrets, service: str) -> dict[str, str]:
    """What one service's container needs to log in to NATS: its own user and password (the control plane also
    the fetch password, to read big bundles from the tenants' object stores)."""
    login = secrets.service_login(service)
    env = {credentials.ENV_USER: login.user, credentials.ENV_PASSWORD: login.password}
    if service == "controlplane":
        env[credentials.ENV_FETCH_PASSWORD] = secrets.fetch_password
    return env


def prepare(data_dir: Path, nats_conf: Path, nats_url: str, service_user: tuple[int, int] | None = None) -> Path:
    """Create or keep the platform's secrets and the default tenant in `data_dir`; render the NATS configuration and
    the services' login files (the proxy's and the reaper's owned by `service_user` when given); return the default
    tenant's credentials file (which names `nats_url`)."""
    secrets = credentials.platform_secrets(data_dir)
    creds = data_dir / CREDENTIALS_FILE
    login = credentials.ensure_default_tenant(data_dir, creds)
    # The host's CLI reaches NATS where compose publishes it: the file says where, so `AUBE_CREDENTIALS=<file>` is
    # all a deployer sets.
    credentials.write_login(creds, login, nats_url=nats_url)
    write_tenant_config(nats_conf, data_dir)
    for service in credentials.SERVICE_USERS:
        env = service_environment(secrets, service)
        text = "".join(f"{name}={value}\n" for name, value in env.items())
        path = data_dir / LOGINS_DIR / service / LOGIN_FILE
        credentials.write_private(path, text)
        owner = login_owner(service, service_user)
        if owner is not None:  # the folder too: it is the mount, and a umask may have closed it
            give_to(path.parent, owner)
            give_to(path, owner)
    return creds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aube.cli.compose_setup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the compose data folder (mounted)")
    parser.add_argument("--nats-conf", type=Path, required=True, help="deploy/nats.conf")
    parser.add_argument("--nats-url", required=True, help="where the host's clients reach NATS")
    parser.add_argument("--service-user", type=parse_user, help="UID:GID the proxy and the reaper run as")
    args = parser.parse_args(argv)
    creds = prepare(args.data, args.nats_conf, args.nats_url, args.service_user)
    print(f"compose setup: platform state ready in {args.data}; the default tenant's login is {creds}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
