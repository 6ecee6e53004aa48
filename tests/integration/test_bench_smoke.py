"""The benchmark's smoke run (`make bench-smoke`): the same code as `make bench` with tiny counts, so it cannot rot.

It asserts that every scenario ran and produced its report, never a timing (the machine is shared). With `--docker`
the Docker scenarios (upload, cold start, a burst) run too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_bench_smoke_runs_every_scenario(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--docker", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=REPO,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    report = (tmp_path / "RESULTS.md").read_text()
    sections = ["## Machine", "## Targets", "## 1. Data path", "## 2. Stream setup", "## 2b. Per open stream"]
    sections += ["## 3. Cold start", "## 4. Burst (process)", "## 4. Burst (docker)", "## 5. Upload to ready"]
    for section in sections:
        assert section in report
    # Every configuration of the data path completed round trips; the proxies' CPU was measured.
    runs = results["datapath"]["runs"]
    configs = {r["config"] for r in runs}
    assert {"direct", "relay", "handoff"} <= configs
    assert all(r["round_trips"] > 0 for r in runs)
    assert all(r["proxy_cpu_us_per_rt"] is not None for r in runs if r["config"] != "direct")
    for path in ("relay", "handoff"):
        assert results["setup"]["setup"][path]["p50_ms"] > 0
        assert results["setup"]["proxy_cpu_us_per_setup"][path] >= 0
        assert path in results["memory"]["kib_per_stream"]
        assert f"`{path}`" in report  # the targets table names the path of each row
    # The killed proxy's streams were all handed off, so the kill tests the handoff (how many were cut is a figure).
    kill = results["kill"]
    assert kill["handed_off"] == kill["streams"] > 0
    cold = results["cold"]
    assert [c["runtime"] for c in cold] == ["process sandboxed (zygote)", "process sandboxed (no zygote)", "docker"]
    assert all(c["aube_s"] > 0 for c in cold)
    assert all(c["python_s"] > 0 for c in cold if c["runtime"] != "docker")
    burst = results["burst"]
    assert burst["served"][0] + burst["rejected"][0] + len(burst["errors"]) >= 1
    assert results["upload"][0]["first_s"] > 0
    assert [u["runtime"] for u in results["upload"]] == ["process", "docker"]
    docker_burst = results["docker_burst"]
    assert docker_burst["served"][0] + docker_burst["rejected"][0] + len(docker_burst["errors"]) >= 1
