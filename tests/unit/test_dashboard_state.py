"""The dashboard's snapshot and its ring of recent activity (pure: no servers)."""

from __future__ import annotations

import json

from aube.proxy import dashboard_state
from aube.proxy.dashboard_state import Counters, History, snapshot
from aube.proxy.handshake import Endpoint, HeadError, parse_head, route
from aube.proxy.metrics import Metrics
from aube.shared.operator_http import host_allowed
from aube.shared.schemas import AccessSection, FunctionRecord, InstanceRecord, Manifest

NOW = 1_000_000.0
SECRET = "instance-secret-9f3c1d"
ENV_VALUE = "deployer-api-key-77aa"
TOKEN_HASH = "ab" * 32


def function(name: str, version: int = 2, *, protected: bool = False) -> FunctionRecord:
    manifest = Manifest(
        env={"API_KEY": ENV_VALUE},
        access=AccessSection(tokens_sha256=[TOKEN_HASH] if protected else []),
    )
    return FunctionRecord(
        name=name,
        version=version,
        manifest=manifest,
        artifact="/srv/aube/artifacts/secret-path",
        runtime="process",
        created_at=NOW - 100,
        updated_at=NOW - 50,
    )


def instance(fn: str, slot: int, state: str, *, host: str = "", version: int = 2, **kw: object) -> InstanceRecord:
    return InstanceRecord(
        function=fn,
        slot=slot,
        instance_id=f"{fn}-{slot}-id",
        version=version,
        state=state,  # type: ignore[arg-type]
        runtime="process",
        owner="cp",
        address="127.0.0.1:40000",
        handle="4242",
        created_at=NOW - 30,
        secret=SECRET,
        host=host,
        **kw,  # type: ignore[arg-type]
    )


def test_snapshot_counts_functions_instances_hosts_and_open_streams() -> None:
    functions = {"rev": function("rev"), "who": function("who", protected=True)}
    instances = [
        instance("who", 1, "busy", host="h2", claimed_by="proxy-a", claimed_at=NOW - 12),
        instance("rev", 0, "free", host="h1"),
        instance("rev", 1, "busy", host="h1", claimed_at=NOW - 3),
        instance("rev", 2, "draining", version=1),
        instance("rev", 3, "starting", host="h2"),
    ]
    state = snapshot(
        proxy_id="proxy-a",
        now=NOW,
        functions=functions,
        instances=instances,
        replica_streams={"rev": 1, "who": 0},
        history=History(),
    )
    assert state.totals.functions == 2 and state.totals.instances == 5
    assert state.totals.open_streams == 2  # busy instances platform-wide: each stream has one
    assert state.totals.states == {"starting": 1, "free": 1, "busy": 2, "draining": 1, "unhealthy": 0}
    rev, who = state.functions
    assert (rev.name, who.name) == ("rev", "who")
    assert rev.states == {"starting": 1, "free": 1, "busy": 1, "draining": 1, "unhealthy": 0}
    assert rev.outdated == 1 and not rev.protected and who.protected
    slots = [(i.function, i.slot) for i in state.instances]
    assert slots == [("rev", 0), ("rev", 1), ("rev", 2), ("rev", 3), ("who", 1)]
    busy = [i for i in state.instances if i.state == "busy"]
    assert [i.busy_for for i in busy] == [3.0, 12.0]
    assert state.instances[0].age == 30.0 and state.instances[0].busy_for is None
    assert {h.host: h.states["busy"] for h in state.hosts} == {dashboard_state.LOCAL_HOST: 0, "h1": 1, "h2": 1}
    assert state.hosts[1].states["free"] == 1
    assert state.replica_streams == {"rev": 1}  # functions with no stream here are left out


def test_state_json_carries_no_secret_field_value() -> None:
    """Instance records carry their credential, function records the deployer's env and token hashes, the artifact's
    path, the instance's address and handle: none of their values may reach the page."""
    functions = {"who": function("who", protected=True)}
    instances = [instance("who", 0, "busy", claimed_by="p", claimed_at=NOW), instance("who", 1, "free")]
    body = dashboard_state.encode(
        snapshot(proxy_id="p", now=NOW, functions=functions, instances=instances, replica_streams={}, history=History())
    ).decode()
    for value in (SECRET, ENV_VALUE, "API_KEY", TOKEN_HASH, "secret-path", "127.0.0.1:40000", "4242"):
        assert value not in body, value
    decoded = json.loads(body)
    assert decoded["functions"][0]["name"] == "who"  # the snapshot is not empty: the values are left out, not all


def test_history_keeps_differences_and_counts_instances_that_appear() -> None:
    h = History(capacity=3, interval=2.0)
    first = h.sample(NOW, Counters(claims=5, rejections=2), ["a", "b"], open_streams=1)
    # The first sample only learns what exists: neither earlier counts nor running instances are recent activity.
    assert (first.claims, first.rejections, first.cold_starts) == (0, 0, 0)
    second = h.sample(NOW + 2, Counters(claims=8, rejections=2), ["a", "b", "c", "d"], open_streams=3)
    assert (second.claims, second.rejections, second.cold_starts, second.open_streams) == (3, 0, 2, 3)
    third = h.sample(NOW + 4, Counters(claims=8, rejections=5), ["c"], open_streams=0)
    assert (third.claims, third.rejections, third.cold_starts) == (0, 3, 0)  # gone ones are no cold starts
    h.sample(NOW + 6, Counters(claims=9, rejections=5), ["c", "e"], open_streams=0)
    series = h.series()
    assert series.t == [NOW + 2, NOW + 4, NOW + 6]  # the ring holds `capacity` samples, oldest first
    assert series.claims == [3, 0, 1] and series.rejections == [0, 3, 0] and series.cold_starts == [2, 0, 1]
    assert series.open_streams == [3, 0, 0] and series.interval == 2.0


def test_history_never_goes_negative() -> None:
    h = History()
    h.sample(NOW, Counters(claims=10, rejections=10), [], open_streams=0)
    assert h.sample(NOW + 2, Counters(claims=1, rejections=0), [], open_streams=0).claims == 0


def test_counters_take_claims_that_gave_an_instance_and_every_rejection() -> None:
    m = Metrics()
    m.claims_total[("rev", "claimed")] += 2
    m.claims_total[("rev", "reserved")] += 1
    m.claims_total[("rev", "lost_race")] += 7
    m.claims_total[("who", "timeout")] += 1
    m.handshakes_rejected_total["no_instance"] += 1
    m.handshakes_rejected_total["not_found"] += 2
    assert dashboard_state.counters(m) == Counters(claims=3, rejections=3)


def test_dashboard_paths_route_to_the_dashboard_endpoint() -> None:
    for path in ("/_aube/dashboard", "/_aube/dashboard/", "/_aube/dashboard/state", "/_aube/dashboard/x.js"):
        head = parse_head(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert not isinstance(head, HeadError)
        assert route(head) == Endpoint(which="dashboard"), path
    post = parse_head(b"POST /_aube/dashboard/state HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not isinstance(post, HeadError)
    assert isinstance(route(post), HeadError)
    other = parse_head(b"GET /_aube/dashboardx HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not isinstance(other, HeadError)
    assert route(other) != Endpoint(which="dashboard")


def test_the_dashboard_answers_by_address_or_local_name_only() -> None:
    """DNS rebinding: a page that resolves its own name to 127.0.0.1 must not read the dashboard through a browser."""
    for host in ("127.0.0.1:9093", "127.0.0.1", "[::1]:9093", "::1", "10.0.0.5:9093", "localhost:9093", "LOCALHOST"):
        assert host_allowed(host, "127.0.0.1"), host
    assert host_allowed("ops.internal:9093", "ops.internal")
    for host in (None, "", "evil.example:9093", "evil.example", "127.0.0.1.evil.example", "[::1"):
        assert not host_allowed(host, "127.0.0.1"), host
