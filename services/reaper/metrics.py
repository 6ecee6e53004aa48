"""The reaper's metrics (pure: no I/O): what it reaped and why, the dead leases it deleted, its passes. Counted where
each action is carried out (service.py); served on the operator address by `aube.shared.operator_http`."""

from __future__ import annotations

from typing import get_args

from aube.reaper.decisions import Reason
from aube.shared.metrics import MetricSet


class ReaperMetrics:
    def __init__(self) -> None:
        self.set = MetricSet()
        self.reaps = self.set.counter(
            "aube_reaps_total",
            "Instances reaped (drained and asked to stop, or a dead host's forgotten), by reason.",
            ["reason"],
        )
        self.leases_deleted = self.set.counter(
            "aube_reaper_leases_deleted_total", "Expired leases deleted, by holder kind (proxy, host).", ["kind"]
        )
        self.passes = self.set.counter("aube_reap_passes_total", "Reap passes, by result (ok, failed).", ["result"])
        # Every reason at 0 from the start: a rate() over a series that appears with its first reap misses that reap.
        for reason in get_args(Reason):
            if reason != "lease_expired":  # a proxy lease's reason (aube_reaper_leases_deleted_total), no instance's
                self.reaps.inc(reason, amount=0)

    def render(self) -> str:
        return self.set.render()
