"""The control plane's metrics (pure: no I/O, no clock): what it built, started, stopped and repaired, and what the
registry held when upkeep last looked. Counted where each event happens (uploads.py, instances.py, upkeep.py,
housekeeping.py); served on the operator address by `aube.shared.operator_http` (service.py).

Label values are bounded: a stop's free-text reason (a log line, or the `reason` of a stop request from a reaper or
a proxy) is reduced to one of `STOP_REASONS` by `stop_reason`.
"""

from __future__ import annotations

import re
from collections import Counter as Tally
from collections.abc import Iterable
from typing import get_args

from aube.shared.metrics import MetricSet
from aube.shared.registry import FunctionEntry, InstanceEntry
from aube.shared.schemas import InstanceState

# A stop's reason as a label: the control plane's own reasons, the reaper's (reaper/decisions.py `Reason`), the
# proxy's (proxy/holdings.py), and `exited` for an instance that ended by itself (upkeep.py).
STOP_REASONS = frozenset(
    {
        # the control plane's own
        "platform_shutdown",
        "retired",
        "delete_grace_period_over",
        "upload_failed",
        "health_probe_done",
        "making_room_for_a_new_version",
        "exited",
        "requested",
        # the reaper's
        "idle",
        "old_version",
        "function_deleted",
        "dead_proxy",
        "lease_expired",
        "dead_host",
        "overdue",
        # the proxy's
        "fresh_per_stream",
        "unhealthy",
    }
)
# The proxy's reasons for marking an instance unhealthy (then asking for its stop): one label.
_UNHEALTHY_PREFIXES = ("unreachable", "no_answer", "handler_still_running")

RECONCILE_KINDS = ("stop_instance", "drop_entry", "remove_version")


def stop_reason(reason: str) -> str:
    """The label for a stop's reason: one of STOP_REASONS, or `other`."""
    slug = re.sub(r"[^a-z0-9]+", "_", reason.lower()).strip("_")
    if slug in STOP_REASONS:
        return slug
    if slug.startswith(_UNHEALTHY_PREFIXES):
        return "unhealthy"
    return "other"


class ControlPlaneMetrics:
    def __init__(self) -> None:
        self.set = MetricSet()
        self.builds = self.set.counter(
            "aube_builds_total", "Versions built (prepared) on upload, by result.", ["result"]
        )
        self.build_duration = self.set.histogram(
            "aube_build_duration_seconds", "Time to build (prepare) a version, by result.", ["result"]
        )
        self.starts = self.set.counter(
            "aube_instance_starts_total",
            "Instance starts, by runtime and result (ok once healthy).",
            ["runtime", "result"],
        )
        self.start_duration = self.set.histogram(
            "aube_instance_start_duration_seconds",
            "Time from an instance's start to its passed health check, by runtime (successful starts).",
            ["runtime"],
        )
        self.stops = self.set.counter(
            "aube_instance_stops_total", "Instances stopped or found ended (exited), by reason.", ["reason"]
        )
        self.reconcile_actions = self.set.counter(
            "aube_reconcile_actions_total",
            "Repairs made by reconcile, by kind (stop_instance, drop_entry, remove_version).",
            ["kind"],
        )
        self.functions = self.set.gauge("aube_functions", "Functions in the registry (deleting ones excluded).")
        self.instances = self.set.gauge(
            "aube_instances", "This control plane's instances in the registry, by state.", ["state"]
        )
        # Known series at 0 from the start: a rate() over a series that appears with its first event misses that one.
        for result in ("ok", "failed"):
            self.builds.inc(result, amount=0)
        self.functions.set(value=0)
        self.instances.replace({(state,): 0 for state in get_args(InstanceState)})

    def built(self, ok: bool, seconds: float) -> None:
        result = "ok" if ok else "failed"
        self.builds.inc(result)
        self.build_duration.observe(seconds, result)

    def started(self, runtime: str, seconds: float) -> None:
        self.starts.inc(runtime, "ok")
        self.start_duration.observe(seconds, runtime)

    def start_failed(self, runtime: str) -> None:
        self.starts.inc(runtime, "failed")

    def stopped(self, reason: str) -> None:
        self.stops.inc(stop_reason(reason))

    def reconciled(self, kind: str, count: int) -> None:
        if count:
            self.reconcile_actions.inc(kind, amount=count)

    def observe_registry(
        self, owner: str, functions: Iterable[FunctionEntry], entries: Iterable[InstanceEntry]
    ) -> None:
        """The gauges, from a registry snapshot upkeep read anyway."""
        self.functions.set(value=sum(1 for f in functions if not f.record.deleting))
        states = Tally(e.record.state for e in entries if e.record.owner == owner)
        self.instances.replace({(state,): states[state] for state in get_args(InstanceState)})

    def render(self) -> str:
        return self.set.render()
