"""Prometheus text rendering."""

from __future__ import annotations

from aube.proxy.metrics import Metrics, render


def test_render_every_family() -> None:
    m = Metrics()
    m.streams_open["rev"] += 2
    m.claims_total[("rev", "claimed")] += 3
    m.scale_requests_total["rev"] += 1
    m.handshakes_rejected_total["invalid_name"] += 4
    m.bytes_client_to_instance += 10
    m.bytes_instance_to_client += 20
    m.observe_claim_latency(0.003)
    m.observe_claim_latency(100.0)
    text = render(m)
    lines = set(text.splitlines())
    assert 'aube_streams_open{function="rev"} 2' in lines
    assert 'aube_claims_total{function="rev",result="claimed"} 3' in lines
    assert 'aube_scale_requests_total{function="rev"} 1' in lines
    assert 'aube_handshakes_rejected_total{reason="invalid_name"} 4' in lines
    assert 'aube_relayed_bytes_total{direction="client_to_instance"} 10' in lines
    assert 'aube_relayed_bytes_total{direction="instance_to_client"} 20' in lines
    assert 'aube_claim_latency_seconds_bucket{le="0.001"} 0' in lines
    assert 'aube_claim_latency_seconds_bucket{le="0.005"} 1' in lines
    assert 'aube_claim_latency_seconds_bucket{le="+Inf"} 2' in lines
    assert "aube_claim_latency_seconds_count 2" in lines
    assert "# TYPE aube_claim_latency_seconds histogram" in lines
    assert text.endswith("\n")


def test_label_values_are_escaped() -> None:
    m = Metrics()
    m.handshakes_rejected_total['a"b\\c\nd'] += 1
    assert 'reason="a\\"b\\\\c\\nd"' in render(m)
