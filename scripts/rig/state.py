"""The rig's state in .data/cluster (folder 0700, files 0600), written again by every `up` from what it keeps:

    platform.env        the services' NATS passwords (aube.shared.credentials.platform_secrets), the NATS nodes'
                        environment: deploy/nats.conf names them
    tenants.json        the tenant list (the default tenant `deployer`); the nodes' tenants.conf comes from it
    credentials.env     the deployer's login, in `make start`'s form, plus AUBE_NATS_URL with the three nodes
    cluster.env         the password of the NATS routes between the nodes
    aube-nats-N/        a node's configuration folder (mounted at /etc/nats)
    aube-host-N/, aube-plane/
                        services.json: that container's services and their environment (mounted at /etc/aube-rig;
                        each container sees its own folder only)

`down` removes the folder with everything else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec

from aube.shared import credentials
from aube.shared import tenants as tenancy
from rig import layout, natsnode
from rig.container.aube_checkout import has_module

CREDENTIALS_FILE = "credentials.env"
CLUSTER_FILE = "cluster.env"
ROUTE_PASSWORD = "AUBE_NATS_ROUTE_PASSWORD"
SERVICES_FILE = "services.json"


def folder(checkout: Path) -> Path:
    return checkout / ".data" / "cluster"


def write_private(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(staging, path)


def _route_password(state: Path) -> str:
    path = state / CLUSTER_FILE
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition("=")
            if key == ROUTE_PASSWORD and credentials.SAFE_PASSWORD.fullmatch(value):
                return value
    except OSError:
        pass
    password = credentials.new_password()
    write_private(path, f"{ROUTE_PASSWORD}={password}\n")
    return password


class Prepared(msgspec.Struct, frozen=True, kw_only=True):
    state: Path
    template: str  # which cluster template the node configurations came from
    skipped: dict[str, str]  # service -> why it does not run


def prepare(checkout: Path) -> Prepared:
    """Write (or rewrite, unchanged when nothing changed) every file of the rig's state."""
    state = folder(checkout)
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    secrets = credentials.platform_secrets(state)
    login = credentials.ensure_default_tenant(state, state / CREDENTIALS_FILE)
    write_private(state / CREDENTIALS_FILE, layout.deployer_credentials(login.user, login.password))

    # Each host's agent logs in as that host alone (aube.shared.agentlogins): its login made once, kept in the state.
    agents = {box.name: credentials.ensure_host(state, box.name)[0] for box in layout.HOSTS}
    hashes = tenancy.TenantFile(state / credentials.TENANT_LIST_FILE).load()
    template = natsnode.write_node_configs(
        checkout, state, hashes, _route_password(state), credentials.host_hashes(state)
    )

    skipped: dict[str, str] = {}
    for box in layout.BOXES:
        logins = layout.Logins(users=dict(credentials.SERVICE_USERS), passwords=secrets.environment())
        if box.name in agents:
            logins = logins.with_login("agent", agents[box.name].user, agents[box.name].password)
        services = []
        for spec in layout.SERVICES[box.role]:
            if spec.needs and not has_module(checkout, spec.needs):
                skipped[spec.name] = f"the checkout has no {spec.needs} yet"
                continue
            services.append(msgspec.to_builtins(layout.runnable(spec, logins)))
        box_dir = state / box.name
        box_dir.mkdir(mode=0o700, exist_ok=True)
        write_private(box_dir / SERVICES_FILE, json.dumps({"services": services}, indent=2) + "\n")
    return Prepared(state=state, template=template, skipped=skipped)


def service_names(state: Path, box: str) -> list[str]:
    """The services `prepare` listed for container `box`."""
    try:
        spec = json.loads((state / box / SERVICES_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [str(service["name"]) for service in spec["services"]]
