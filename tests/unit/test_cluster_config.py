"""The replica-count decision (buckets.new_replicas) and a cluster node's configuration rendered from
deploy/cluster/node.conf (natsserver.render_cluster_node): pure, no server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from aube.shared.buckets import Resize, new_replicas
from aube.shared.errors import RuntimeFailure
from aube.shared.natsserver import ClusterNode, render_cluster_node

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = (REPO / "deploy" / "cluster" / "node.conf").read_text()
PASSWORD = "Abcdefgh12345678XYZ"


def test_the_control_plane_sets_the_count_the_cli_only_raises_it_and_other_services_leave_it() -> None:
    assert new_replicas(1, 3, Resize.EXACT) == 3
    assert new_replicas(3, 1, Resize.EXACT) == 1
    assert new_replicas(3, 3, Resize.EXACT) is None
    assert new_replicas(1, 3, Resize.RAISE) == 3
    assert new_replicas(3, 1, Resize.RAISE) is None  # a deployer without the setting undoes nothing
    assert new_replicas(1, 3, Resize.NEVER) is None  # proxies and reapers may not update streams
    assert new_replicas(3, 1, Resize.NEVER) is None


def node(i: int, host: str = "127.0.0.1") -> ClusterNode:
    return ClusterNode(
        name=f"aube-nats-{i}",
        client=f"{host}:{4221 + i}",
        monitor=f"{host}:{8221 + i}",
        cluster_listen=f"{host}:{6221 + i}",
        route=f"{host}:{6221 + i}",
    )


def test_a_node_includes_the_single_server_configuration_and_adds_its_cluster_part() -> None:
    nodes = [node(1), node(2), node(3)]
    text = render_cluster_node(TEMPLATE, nodes[1], nodes, store_dir="/data/nats", route_password=PASSWORD)
    assert 'include "nats.conf"' in text  # the accounts, users and permissions of deploy/nats.conf
    assert 'server_name: "aube-nats-2"' in text
    assert 'listen: "127.0.0.1:4223"' in text and 'http: "127.0.0.1:8223"' in text
    assert 'store_dir: "/data/nats"' in text
    assert re.search(r"^\s*sync_interval: always$", text, re.M)
    # The same routes on every node, each carrying the route login the cluster block demands.
    routes = re.findall(r'"nats-route://aube-route:(\w+)@([\d.:]+)"', text)
    assert routes == [(PASSWORD, "127.0.0.1:6222"), (PASSWORD, "127.0.0.1:6223"), (PASSWORD, "127.0.0.1:6224")]
    assert f'password: "{PASSWORD}"' in text
    assert "${" not in text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"route_password": "short1"}, "route password"),
        ({"route_password": 'x" }\nauthorization {user: a'}, "route password"),
        ({"store_dir": '/data"\nlisten: 0.0.0.0:1'}, "store folder"),
        ({"node": ClusterNode(name="x", client="a:1", monitor="a:2", cluster_listen="a:3", route="a:3")}, "one of"),
        ({"nodes": [node(1), node(1)]}, "one of"),
        ({"nodes": [node(1), node(2), node(3, host='h" ]')]}, "host:port"),
    ],
)
def test_values_that_would_change_the_configurations_meaning_are_refused(
    change: dict[str, object], message: str
) -> None:
    nodes = [node(1), node(2), node(3)]
    args: dict[str, object] = {"node": nodes[0], "nodes": nodes, "store_dir": "/data", "route_password": PASSWORD}
    args.update(change)
    with pytest.raises(RuntimeFailure, match=message):
        render_cluster_node(TEMPLATE, **args)  # type: ignore[arg-type]
