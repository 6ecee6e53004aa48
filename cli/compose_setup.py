"""The `setup` step of deploy/compose.yaml: the platform's state in the compose data folder, before any service runs.

On the first start it creates what `aube start` creates in .data (the services' NATS passwords in platform.env, the
default tenant `deployer` and its credentials.env); on later starts it keeps them. Every start renders the NATS run
configuration from deploy/nats.conf and the tenant list again, and writes each service's own login into a folder
of its own (`logins/<service>/login.env`), the only part of the data folder that service's container mounts:
a proxy never sees the control plane's password. nats-server itself mounts platform.env, which holds them all.

Run inside the setup container: `python -m aube.cli.compose_setup --data /srv/aube --nats-url nats://…`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from aube.cli.platform import write_tenant_config
from aube.shared import credentials

LOGINS_DIR = "logins"
LOGIN_FILE = "login.env"
CREDENTIALS_FILE = "credentials.env"


def service_environment(secrets: credentials.PlatformSecrets, service: str) -> dict[str, str]:
    """What one service's container needs to log in to NATS: its own user and password (the control plane also
    the fetch password, to read big bundles from the tenants' object stores)."""
    login = secrets.service_login(service)
    env = {credentials.ENV_USER: login.user, credentials.ENV_PASSWORD: login.password}
    if service == "controlplane":
        env[credentials.ENV_FETCH_PASSWORD] = secrets.fetch_password
    return env


def prepare(data_dir: Path, nats_conf: Path, nats_url: str) -> Path:
    """Create or keep the platform's secrets and the default tenant in `data_dir`; render the NATS configuration and
    the services' login files; return the default tenant's credentials file (which names `nats_url`)."""
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
        credentials.write_private(data_dir / LOGINS_DIR / service / LOGIN_FILE, text)
    return creds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aube.cli.compose_setup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the compose data folder (mounted)")
    parser.add_argument("--nats-conf", type=Path, required=True, help="deploy/nats.conf")
    parser.add_argument("--nats-url", required=True, help="where the host's clients reach NATS")
    args = parser.parse_args(argv)
    creds = prepare(args.data, args.nats_conf, args.nats_url)
    print(f"compose setup: platform state ready in {args.data}; the default tenant's login is {creds}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
