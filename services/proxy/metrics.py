"""The proxy's counters and their Prometheus text rendering, through `aube.shared.metrics`'s line writers (pure:
no I/O, no clock).

The Python relay adds to plain integer attributes per chunk, the native engine keeps its own totals (read at
rendering); everything else changes once per handshake or stream.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Mapping

from aube.shared.metrics import family, histogram, sample

LATENCY_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.streams_open: defaultdict[str, int] = defaultdict(int)
        # Streams whose client socket went to the instance (proxy/handoff.py): no byte of them is relayed.
        self.streams_handed_off_total: defaultdict[str, int] = defaultdict(int)
        # Relayed streams by the engine that moved their bytes ("native" or "python", proxy/native_relay.py).
        self.streams_relayed_total: defaultdict[str, int] = defaultdict(int)
        # Handed-off streams the proxy cut because their instance left them open past a limit: (function, limit).
        self.limits_enforced_total: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.claims_total: defaultdict[tuple[str, str], int] = defaultdict(int)  # (function, result)
        self.scale_requests_total: defaultdict[str, int] = defaultdict(int)
        self.handshakes_rejected_total: defaultdict[str, int] = defaultdict(int)
        # Hot path: two plain ints, added to per chunk the protocols relay (relay.py).
        self.bytes_client_to_instance = 0
        self.bytes_instance_to_client = 0
        # The native relay engine's own totals (client -> instance, instance -> client), read when rendered.
        self.native_bytes: Callable[[], tuple[int, int]] = lambda: (0, 0)
        self.claim_latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)  # last one is +Inf
        self.claim_latency_sum = 0.0

    def observe_claim_latency(self, seconds: float) -> None:
        self.claim_latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.claim_latency_sum += seconds


def render(m: Metrics) -> str:
    """Prometheus text exposition format 0.0.4 (the line writers are shared with the other services)."""
    out: list[str] = []
    family(out, "aube_streams_open", "gauge", "Streams currently relayed, by function.")
    _by_label(out, "aube_streams_open", "function", m.streams_open)

    family(out, "aube_claims_total", "counter", "Claim attempts for a client, by function and result.")
    for function, result in sorted(m.claims_total):
        sample(
            out, "aube_claims_total", [("function", function), ("result", result)], m.claims_total[(function, result)]
        )

    family(out, "aube_claim_latency_seconds", "histogram", "Time from a client's head to a claimed instance.")
    histogram(out, "aube_claim_latency_seconds", LATENCY_BUCKETS, m.claim_latency_counts, m.claim_latency_sum)

    family(out, "aube_scale_requests_total", "counter", "Scale requests sent to the control plane, by function.")
    _by_label(out, "aube_scale_requests_total", "function", m.scale_requests_total)

    family(out, "aube_streams_handed_off_total", "counter", "Streams handed to their instance, by function.")
    _by_label(out, "aube_streams_handed_off_total", "function", m.streams_handed_off_total)
    family(
        out,
        "aube_handed_off_limits_enforced_total",
        "counter",
        "Handed-off streams the proxy cut past a limit their instance did not enforce, by function and limit.",
    )
    for function, limit in sorted(m.limits_enforced_total):
        labels = [("function", function), ("limit", limit)]
        sample(out, "aube_handed_off_limits_enforced_total", labels, m.limits_enforced_total[(function, limit)])
    family(out, "aube_streams_relayed_total", "counter", "Streams relayed by the proxy, by relay engine.")
    _by_label(out, "aube_streams_relayed_total", "engine", m.streams_relayed_total)
    family(out, "aube_relayed_bytes_total", "counter", "Bytes relayed after the handshake, by direction.")
    native_in, native_out = m.native_bytes()
    sample(
        out, "aube_relayed_bytes_total", [("direction", "client_to_instance")], m.bytes_client_to_instance + native_in
    )
    sample(
        out, "aube_relayed_bytes_total", [("direction", "instance_to_client")], m.bytes_instance_to_client + native_out
    )

    family(out, "aube_handshakes_rejected_total", "counter", "Requests answered before any upgrade, by reason.")
    _by_label(out, "aube_handshakes_rejected_total", "reason", m.handshakes_rejected_total)
    return "\n".join(out) + "\n"


def _by_label(out: list[str], name: str, label: str, values: Mapping[str, int]) -> None:
    for key in sorted(values):
        sample(out, name, [(label, key)], values[key])
