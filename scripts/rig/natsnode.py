"""The rig's NATS node configurations: the platform's own deploy/nats.conf (accounts, users, permissions, the
tenant includes and the host agents' users, rendered by aube.shared.natsserver from .data/cluster's tenant and host
lists) with deploy/cluster/node.conf's cluster block per node."""

from __future__ import annotations

from pathlib import Path

from aube.shared import natsserver
from rig.layout import NATS_CLIENT_PORT, NATS_CLUSTER_PORT, NATS_MONITOR_PORT, NATS_NODES, NATS_STORE

NODE_CONFIG = natsserver.NODE_CONFIG
JETSTREAM_STORE = NATS_STORE  # the node's volume (nats-server keeps its files in a `jetstream` folder there)


def write_node_configs(
    checkout: Path,
    state: Path,
    tenant_hashes: dict[str, str],
    route_password: str,
    host_hashes: dict[str, str],
) -> str:
    """Write each node's run folder (<state>/<node name>: node.conf beside deploy/nats.conf's run copy and its
    includes); returns which template was used, for the log."""
    nats_conf = checkout / "deploy" / "nats.conf"
    template = checkout / "deploy" / "cluster" / NODE_CONFIG
    nodes = [natsserver.ClusterNode(**_addresses(n.name)) for n in NATS_NODES]
    for node in nodes:
        natsserver.write_cluster_node_config(
            nats_conf,
            template,
            state / node.name,
            tenant_hashes,
            node,
            nodes,
            store_dir=JETSTREAM_STORE,
            route_password=route_password,
            host_hashes=host_hashes,
        )
    return str(template.relative_to(checkout))


def _addresses(name: str) -> dict[str, str]:
    return {
        "name": name,
        "client": f"0.0.0.0:{NATS_CLIENT_PORT}",
        "monitor": f"0.0.0.0:{NATS_MONITOR_PORT}",
        "cluster_listen": f"0.0.0.0:{NATS_CLUSTER_PORT}",
        "route": f"{name}:{NATS_CLUSTER_PORT}",  # the node's name on the rig network
    }
