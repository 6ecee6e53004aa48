"""The rig's NATS node configurations: the platform's own deploy/nats.conf (accounts, users, permissions and the
tenant includes, rendered by aube.shared.natsserver from .data/cluster's tenant list) with a cluster block per node.

The cluster block comes from deploy/cluster/node.conf through aube.shared.natsserver.write_cluster_node_config
when the checkout has them (the replicated-state work of issue 10 adds both). Until then the rig renders the same
template, kept here as FALLBACK_TEMPLATE in the same `string.Template` form with the same fields: once the checkout
has deploy/cluster/node.conf this copy is unused, and it and `_write_fallback` are to be deleted.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

from aube.shared import natsserver
from rig.layout import NATS_CLIENT_PORT, NATS_CLUSTER_PORT, NATS_MONITOR_PORT, NATS_NODES, NATS_STORE

NODE_CONFIG = "node.conf"
ROUTE_USER = "aube-route"
JETSTREAM_STORE = NATS_STORE  # the node's volume (nats-server keeps its files in a `jetstream` folder there)

FALLBACK_TEMPLATE = """\
# One node of the rig's NATS cluster, rendered by scripts/rig/natsnode.py (a stand-in for deploy/cluster/node.conf).
include "nats.conf"
server_name: "${name}"
listen: "${client}"
http: "${monitor}"
jetstream {
  store_dir: "${store_dir}"
  max_memory_store: 256MB
  max_file_store: 4GB
  # Acknowledged writes survive a power loss of the whole cluster only when synced before the acknowledgement.
  sync_interval: always
}
cluster {
  name: "aube"
  listen: "${cluster}"
  authorization {
    user: "${route_user}"
    password: "${route_password}"
  }
  routes: [
${routes}
  ]
}
"""


def write_node_configs(checkout: Path, state: Path, tenant_hashes: dict[str, str], route_password: str) -> str:
    """Write each node's run folder (<state>/<node name>: node.conf beside deploy/nats.conf's run copy and its
    includes); returns which template was used, for the log."""
    nats_conf = checkout / "deploy" / "nats.conf"
    template = checkout / "deploy" / "cluster" / NODE_CONFIG
    # Looked up, not imported: the checkout may predate them.
    write_shared = getattr(natsserver, "write_cluster_node_config", None)
    node_type = getattr(natsserver, "ClusterNode", None)
    shared = template.exists() and write_shared is not None and node_type is not None
    for node in NATS_NODES:
        run_dir = state / node.name
        if shared:
            nodes = [node_type(**_addresses(n.name)) for n in NATS_NODES]  # type: ignore[misc]
            write_shared(  # type: ignore[misc]
                nats_conf,
                template,
                run_dir,
                tenant_hashes,
                next(n for n in nodes if n.name == node.name),
                nodes,
                store_dir=JETSTREAM_STORE,
                route_password=route_password,
            )
        else:
            _write_fallback(node.name, nats_conf, run_dir, tenant_hashes, route_password)
    return str(template.relative_to(checkout)) if shared else "the rig's stand-in for deploy/cluster/node.conf"


def _addresses(name: str) -> dict[str, str]:
    return {
        "name": name,
        "client": f"0.0.0.0:{NATS_CLIENT_PORT}",
        "monitor": f"0.0.0.0:{NATS_MONITOR_PORT}",
        "cluster_listen": f"0.0.0.0:{NATS_CLUSTER_PORT}",
        "route": f"{name}:{NATS_CLUSTER_PORT}",  # the node's name on the rig network
    }


def _write_fallback(
    name: str, nats_conf: Path, run_dir: Path, tenant_hashes: dict[str, str], route_password: str
) -> None:
    natsserver.write_run_config(nats_conf, run_dir, tenant_hashes)
    me = _addresses(name)
    routes = ",\n".join(
        f'    "nats-route://{ROUTE_USER}:{route_password}@{_addresses(n.name)["route"]}"' for n in NATS_NODES
    )
    text = string.Template(FALLBACK_TEMPLATE).substitute(
        name=name,
        client=me["client"],
        monitor=me["monitor"],
        cluster=me["cluster_listen"],
        store_dir=JETSTREAM_STORE,
        route_user=ROUTE_USER,
        route_password=route_password,
        routes=routes,
    )
    path = run_dir / NODE_CONFIG
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)  # it holds the route password
    with os.fdopen(fd, "w") as f:
        f.write(text)
