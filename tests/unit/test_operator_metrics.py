"""The shared metric families and renderer, the operator endpoint's answers, the control plane's and the reaper's
metric definitions, and `aube start`'s choice of operator ports (pure: no servers)."""

from __future__ import annotations

import pytest

from aube.cli.platform import metrics_endpoints
from aube.controlplane.metrics import STOP_REASONS, ControlPlaneMetrics, stop_reason
from aube.reaper.metrics import ReaperMetrics
from aube.shared import operator_http
from aube.shared.metrics import MetricSet, exported_names
from aube.shared.registry import FunctionEntry, InstanceEntry
from aube.shared.schemas import FunctionRecord, InstanceRecord, Manifest


def test_families_render_in_the_exposition_format() -> None:
    metrics = MetricSet()
    builds = metrics.counter("x_builds_total", "Builds.", ["result"])
    ready = metrics.gauge("x_ready", "Ready.")
    took = metrics.histogram("x_seconds", "Durations.", ["kind"], bounds=(1.0, 10.0))
    builds.inc("ok")
    builds.inc("ok")
    builds.inc('we"ird')
    ready.set(value=3)
    took.observe(0.5, "a")
    took.observe(5.0, "a")
    took.observe(50.0, "a")
    lines = metrics.render().splitlines()
    assert lines[:2] == ["# HELP x_builds_total Builds.", "# TYPE x_builds_total counter"]
    assert 'x_builds_total{result="ok"} 2' in lines
    assert 'x_builds_total{result="we\\"ird"} 1' in lines
    assert "# TYPE x_ready gauge" in lines and "x_ready 3" in lines
    assert 'x_seconds_bucket{kind="a",le="1"} 1' in lines
    assert 'x_seconds_bucket{kind="a",le="10"} 2' in lines
    assert 'x_seconds_bucket{kind="a",le="+Inf"} 3' in lines
    assert 'x_seconds_sum{kind="a"} 55.5' in lines
    assert 'x_seconds_count{kind="a"} 3' in lines
    assert took.count("a") == 3 and builds.get("ok") == 2
    assert metrics.sample_names() == exported_names(metrics.render())


def test_labels_are_checked_and_names_unique() -> None:
    metrics = MetricSet()
    builds = metrics.counter("x_total", "X.", ["result"])
    with pytest.raises(ValueError, match="takes labels"):
        builds.inc()
    with pytest.raises(ValueError, match="defined twice"):
        metrics.gauge("x_total", "Again.")


def test_exported_names_include_families_without_samples() -> None:
    text = '# HELP a_total A.\n# TYPE a_total counter\n# TYPE h histogram\nb{x="1"} 2\nc 1\n'
    assert exported_names(text) == {"a_total", "h_bucket", "h_sum", "h_count", "b", "c"}


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /_aube/metrics HTTP/1.1\r\nHost: 127.0.0.1:9091", 200),
        (b"GET /_aube/metrics?x=1 HTTP/1.1\r\nhost: localhost", 200),
        (b"GET /_aube/metrics HTTP/1.1\r\nHost: [::1]:9092", 200),
        # DNS rebinding: a page named evil.example resolving to 127.0.0.1 reads nothing; nor does a head without Host.
        (b"GET /_aube/metrics HTTP/1.1\r\nHost: evil.example:9091", 403),
        (b"GET /_aube/metrics HTTP/1.0", 403),
        (b"GET /_aube/health HTTP/1.1", 200),
        (b"POST /_aube/metrics HTTP/1.1", 405),
        (b"GET /fn HTTP/1.1\r\nUpgrade: websocket", 404),
        (b"GET / HTTP/1.1", 404),
        (b"garbage", 400),
    ],
)
def test_the_operator_endpoint_serves_metrics_and_health_only(head: bytes, status: int) -> None:
    reply = operator_http.answer(head, lambda: "x_total 1\n")
    assert reply.startswith(f"HTTP/1.1 {status} ".encode())
    assert (b"x_total 1" in reply) == (status == 200 and b"metrics" in head)


def test_head_gets_no_body() -> None:
    reply = operator_http.answer(b"HEAD /_aube/metrics HTTP/1.1\r\nHost: localhost", lambda: "x_total 1\n")
    assert reply.endswith(b"\r\n\r\n") and b"Content-Length: 10" in reply


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        ("platform shutdown", "platform_shutdown"),
        ("retired", "retired"),
        ("delete grace period over", "delete_grace_period_over"),
        ("upload failed", "upload_failed"),
        ("health probe done", "health_probe_done"),
        ("making room for a new version", "making_room_for_a_new_version"),
        ("idle", "idle"),
        ("dead_proxy", "dead_proxy"),
        ("overdue", "overdue"),
        ("fresh_per_stream", "fresh_per_stream"),
        ("unreachable (settled after a registry outage)", "unhealthy"),
        ("no answer to a request head", "unhealthy"),
        ("handler still running after its stream", "unhealthy"),
        ("whatever a client\nmade up", "other"),
    ],
)
def test_stop_reasons_are_a_bounded_label(reason: str, label: str) -> None:
    assert stop_reason(reason) == label
    assert label in STOP_REASONS | {"other"}


def _instance(function: str, slot: int, state: str, owner: str) -> InstanceEntry:
    record = InstanceRecord(
        function=function,
        slot=slot,
        instance_id=f"i{slot}",
        version=1,
        state=state,
        owner=owner,
        created_at=0.0,
        runtime="process",
    )  # type: ignore[arg-type]
    return InstanceEntry(f"{function}.{slot}", 1, record)


def _function(name: str, deleting: bool = False) -> FunctionEntry:
    record = FunctionRecord(
        name=name,
        version=1,
        artifact="a",
        manifest=Manifest(),
        runtime="process",
        created_at=0.0,
        updated_at=0.0,
        deleting=deleting,
    )
    return FunctionEntry(name, 1, record)


def test_controlplane_gauges_count_its_own_instances_by_state() -> None:
    m = ControlPlaneMetrics()
    assert 'aube_instances{state="free"} 0' in m.render()
    entries = [_instance("a", 1, "free", "me"), _instance("a", 2, "busy", "me"), _instance("a", 3, "free", "other")]
    m.observe_registry("me", [_function("a"), _function("b", deleting=True)], entries)
    lines = m.render().splitlines()
    assert "aube_functions 1" in lines
    assert 'aube_instances{state="free"} 1' in lines
    assert 'aube_instances{state="busy"} 1' in lines
    assert 'aube_instances{state="starting"} 0' in lines


def test_controlplane_counters() -> None:
    m = ControlPlaneMetrics()
    m.built(True, 2.0)
    m.built(False, 0.1)
    m.started("process", 0.3)
    m.start_failed("process")
    m.stopped("retired")
    m.reconciled("drop_entry", 2)
    m.reconciled("stop_instance", 0)
    lines = m.render().splitlines()
    assert 'aube_builds_total{result="ok"} 1' in lines
    assert 'aube_builds_total{result="failed"} 1' in lines
    assert 'aube_build_duration_seconds_count{result="ok"} 1' in lines
    assert 'aube_instance_starts_total{result="ok",runtime="process"} 1' not in lines  # labels keep their order
    assert 'aube_instance_starts_total{runtime="process",result="ok"} 1' in lines
    assert 'aube_instance_starts_total{runtime="process",result="failed"} 1' in lines
    assert 'aube_instance_start_duration_seconds_count{runtime="process"} 1' in lines
    assert 'aube_instance_stops_total{reason="retired"} 1' in lines
    assert 'aube_reconcile_actions_total{kind="drop_entry"} 2' in lines
    assert not any(line.startswith('aube_reconcile_actions_total{kind="stop_instance"}') for line in lines)


def test_reaper_reasons_start_at_zero() -> None:
    m = ReaperMetrics()
    m.reaps.inc("idle")
    lines = m.render().splitlines()
    assert 'aube_reaps_total{reason="idle"} 1' in lines
    assert 'aube_reaps_total{reason="dead_proxy"} 0' in lines
    assert "# TYPE aube_reap_passes_total counter" in lines


def test_aube_start_gives_each_service_its_own_operator_port() -> None:
    assert metrics_endpoints({}, 2) == {"controlplane": 9091, "reaper": 9092, "proxy-1": 9093, "proxy-2": 9094}
    env = {"AUBE_CONTROLPLANE_OPERATOR_PORT": "off", "AUBE_REAPER_OPERATOR_PORT": "0", "AUBE_OPERATOR_PORT": "0"}
    assert metrics_endpoints(env, 2) == {"reaper": 0, "proxy-1": 0, "proxy-2": 0}
    with pytest.raises(SystemExit, match="controlplane and proxy-1 on 9091; reaper and proxy-2 on 9092"):
        metrics_endpoints({"AUBE_OPERATOR_PORT": "9091"}, 2)
    with pytest.raises(SystemExit, match="AUBE_REAPER_OPERATOR_PORT must be a port"):
        metrics_endpoints({"AUBE_REAPER_OPERATOR_PORT": "lots"}, 1)


@pytest.mark.anyio
async def test_idle_connections_beyond_the_cap_are_closed_and_metrics_still_answer() -> None:
    """Red-team finding: idle connections (each may hold HEAD_TIMEOUT + SEND_TIMEOUT) used up a root service's
    descriptors. Past MAX_CONNECTIONS one is closed at once; once they go, a scrape is answered."""
    import contextlib

    import anyio

    async with anyio.create_task_group() as tg:
        port = await tg.start(operator_http.serve, "127.0.0.1", 0, lambda: "x_total 1\n", "AUBE_TEST_PORT")
        idle = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(operator_http.MAX_CONNECTIONS)]
        await anyio.sleep(0.2)  # every one accepted and holding its slot
        extra = await anyio.connect_tcp("127.0.0.1", port)
        # Closed without an answer (end of stream or a reset): what the cap does.
        with anyio.fail_after(2), contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
            assert await extra.receive() == b""
        for conn in idle:
            await conn.aclose()
        await anyio.sleep(0.2)
        scrape = await anyio.connect_tcp("127.0.0.1", port)
        await scrape.send(b"GET /_aube/metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        with anyio.fail_after(5):
            reply = await scrape.receive()
        assert reply.startswith(b"HTTP/1.1 200 ")
        await scrape.aclose()
        await extra.aclose()
        tg.cancel_scope.cancel()
