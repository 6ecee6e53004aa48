"""deploy/grafana/aube.json and deploy/prometheus.yml against what the services export: every metric a dashboard
query names is one a service defines (so the dashboard cannot drift from the code), every family is on the
dashboard, and the scrape config targets the default operator ports. The names come from the metric definitions
(an empty render of each service's metrics); the integration test checks a real scrape exports exactly those."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from aube.controlplane.metrics import ControlPlaneMetrics
from aube.proxy.metrics import Metrics, render
from aube.reaper.metrics import ReaperMetrics
from aube.shared.metrics import exported_names
from aube.shared.settings import (
    DEFAULT_CONTROLPLANE_OPERATOR_PORT,
    DEFAULT_OPERATOR_PORT,
    DEFAULT_REAPER_OPERATOR_PORT,
)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
METRIC = re.compile(r"\baube_[a-z0-9_]+\b")


def exported() -> set[str]:
    return (
        exported_names(render(Metrics()))
        | exported_names(ControlPlaneMetrics().render())
        | exported_names(ReaperMetrics().render())
    )


def queries(node: Any) -> list[str]:
    """Every `expr` anywhere in the dashboard (panels, rows' panels, targets)."""
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [q for value in node.values() for q in queries(value)]
    if isinstance(node, list):
        return [q for value in node for q in queries(value)]
    return []


def dashboard_queries() -> list[str]:
    return queries(json.loads((DEPLOY / "grafana" / "aube.json").read_text()))


def test_every_metric_the_dashboard_queries_is_exported() -> None:
    exprs = dashboard_queries()
    assert len(exprs) >= 15
    for expr in exprs:
        used = set(METRIC.findall(expr))
        assert used, f"a query without an aube metric: {expr}"
        assert used <= exported(), f"{expr} uses {sorted(used - exported())}, which no service exports"


def test_every_exported_family_is_on_the_dashboard() -> None:
    def family(name: str) -> str:
        return re.sub(r"_(bucket|sum|count)$", "", name)

    used = {family(name) for expr in dashboard_queries() for name in METRIC.findall(expr)}
    missing = {family(name) for name in exported()} - used
    assert not missing, f"exported but on no dashboard panel: {sorted(missing)}"


def test_the_scrape_config_targets_the_default_operator_ports() -> None:
    text = (DEPLOY / "prometheus.yml").read_text()
    jobs = dict(re.findall(r"job_name: (\S+)\n(?:.*\n)*?\s+- targets: \[([^\]]*)\]", text))
    ports = {
        job: {int(t.strip().strip('"').rsplit(":", 1)[1]) for t in targets.split(",")} for job, targets in jobs.items()
    }
    assert ports == {
        "aube-proxy": {DEFAULT_OPERATOR_PORT, DEFAULT_OPERATOR_PORT + 1},
        "aube-controlplane": {DEFAULT_CONTROLPLANE_OPERATOR_PORT},
        "aube-reaper": {DEFAULT_REAPER_OPERATOR_PORT},
    }
    assert text.count("metrics_path: /_aube/metrics") == 3
