"""The benchmark's smoke run (`make bench-smoke`): the same code as `make bench` with tiny counts, so it cannot rot.

It asserts that every scenario ran and produced its report, never a timing (the machine is shared).
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
        [sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    report = (tmp_path / "RESULTS.md").read_text()
    for section in ("## Machine", "## Targets", "## 1. Data path", "## 2. Stream setup", "## 3. Cold start",
                    "## 4. Burst", "## 5. Upload to ready"):  # fmt: skip
        assert section in report
    # Every configuration of the data path completed round trips; the proxies' CPU was measured.
    runs = results["datapath"]["runs"]
    configs = {r["config"] for r in runs}
    assert {"direct", "aube"} <= configs
    assert all(r["round_trips"] > 0 for r in runs)
    assert all(r["proxy_cpu_us_per_rt"] is not None for r in runs if r["config"] != "direct")
    assert results["setup"]["setup"]["aube"]["p50_ms"] > 0
    assert [c["runtime"] for c in results["cold"]] == ["process sandboxed (zygote)", "process sandboxed (no zygote)"]
    assert all(c["aube_s"] > 0 and c["python_s"] > 0 for c in results["cold"])
    burst = results["burst"]
    assert burst["served"][0] + burst["rejected"][0] + len(burst["errors"]) >= 1
    assert results["upload"][0]["first_s"] > 0
