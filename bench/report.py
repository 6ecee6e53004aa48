"""The report: RESULTS.md (targets table and one section per scenario) and results.png, from results.json."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from common import BENCH, Settings, log


def machine() -> dict[str, str]:
    def sh(*cmd: str) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=20)
            return (out.stdout or out.stderr).strip()
        except (OSError, subprocess.TimeoutExpired):
            return "n/a"

    model = "n/a"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {
        "cpus (nproc)": str(os.cpu_count()),
        "cpu model": model,
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": nginx_version(),
        "docker": sh("docker", "version", "--format", "{{.Server.Version}}"),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "load average (1, 5, 15 min) at the start": load_average(),
    }


def load_average() -> str:
    """The machine's load when read: other work on a shared machine shows here (every figure is slower)."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def fmt(v: Any, digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return f"{v:,.{digits}f}" if isinstance(v, float | int) else str(v)


def size_label(size: int) -> str:
    return "64 KiB" if size == 65536 else f"{size} B"


# The data path's targets: proxy CPU per round trip as a ratio to tuned nginx's, at most this much.
CPU_BOUNDS = {"handoff": 0.1, "relay": 1.0}
SETUP_ADDED_MS = 0.5  # stream setup p50 added over direct, at most


def targets_of(results: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) rows; met None = a figure with no target (shown as n/a)."""
    out: list[tuple[str, str, bool | None]] = []
    dp = results.get("datapath")
    if dp and dp["nginx"]:
        for path, bound in CPU_BOUNDS.items():
            for size in sorted({row["size"] for row in dp["table"]}):
                for streams in sorted({r["streams"] for r in dp["table"]}):
                    by = {r["config"]: r for r in dp["table"] if r["size"] == size and r["streams"] == streams}
                    if path not in by:
                        continue
                    a, t = by[path]["proxy_cpu_us_per_rt"], by["nginx-tuned"]["proxy_cpu_us_per_rt"]
                    ratio = a / t if a is not None and t else None
                    out.append(
                        (
                            f"proxy CPU/round trip, `{path}` vs `tuned nginx` <= {bound:.1f}x "
                            f"({size_label(size)}, {streams} stream{'s' if streams > 1 else ''})",
                            f"{fmt(ratio, 2)}x ({fmt(a, 1)} vs {fmt(t, 1)} µs)",
                            None if ratio is None else ratio <= bound,
                        )
                    )
    if dp:
        for size in sorted({row["size"] for row in dp["table"]}):
            for streams in sorted({r["streams"] for r in dp["table"]}):
                by = {r["config"]: r for r in dp["table"] if r["size"] == size and r["streams"] == streams}
                if "relay" in by and "relay-python" in by:
                    a, t = by["relay"]["proxy_cpu_us_per_rt"], by["relay-python"]["proxy_cpu_us_per_rt"]
                    ratio = a / t if a is not None and t else None
                    out.append(
                        (
                            f"proxy CPU/round trip, `relay` vs `relay-python` (no target; "
                            f"{size_label(size)}, {streams} stream{'s' if streams > 1 else ''})",
                            f"{fmt(ratio, 2)}x ({fmt(a, 1)} vs {fmt(t, 1)} µs)",
                            None,
                        )
                    )
    su = results.get("setup")
    if su and isinstance(su.get("added_p50_ms"), dict):
        for path, added in su["added_p50_ms"].items():
            out.append(
                (
                    f"stream setup p50 added over direct, `{path}` <= {SETUP_ADDED_MS} ms",
                    f"+{added:.2f} ms",
                    added <= SETUP_ADDED_MS,
                )
            )
        for path, cpu in su["proxy_cpu_us_per_setup"].items():
            out.append((f"proxy CPU per stream (setup + teardown), `{path}` (no target)", f"{cpu:,.0f} µs", None))
    mem = results.get("memory")
    if mem:
        for path, kib in mem["kib_per_stream"].items():
            out.append((f"proxy memory per open stream, `{path}` (no target)", f"{kib:.1f} KiB", None))
    for cold in results.get("cold", []):
        if cold["runtime"] == "docker":
            out.append(
                (
                    "Docker cold start <= 1.2x bare docker run",
                    f"{cold['ratio']:.2f}x ({cold['aube_s'] * 1000:.0f} vs {cold['floor_port_s'] * 1000:.0f} ms)",
                    cold["ratio"] <= 1.2,
                )
            )
        elif "no zygote" not in cold["runtime"]:
            python = cold.get("python_s")
            against = f", bare `python -c pass` {python * 1000:.0f} ms, {cold['ratio_python']:.2f}x" if python else ""
            out.append(
                (
                    "process cold start to first echo <= 100 ms",
                    f"{cold['aube_s'] * 1000:.0f} ms (bare server start {cold['floor_port_s'] * 1000:.0f} ms{against})",
                    cold["aube_s"] <= 0.100,
                )
            )
    for key, runtime in (("burst", "process"), ("docker_burst", "Docker")):
        b = results.get(key)
        if b:
            ok = all(x == b["clients"] for x in b["served"]) and not any(b["rejected"])
            out.append(
                (
                    f"{runtime} burst of {b['clients']} clients, min_free=2: all served, 0 rejected",
                    f"served {b['served']}, rejected {b['rejected']}",
                    ok,
                )
            )
    k = results.get("kill")
    if k:
        out.append(
            (
                f"kill -9 of a proxy with {k['streams']} handed-off streams: 0 cut",
                f"{k['cut']} cut ({k['handed_off']} flagged handed off in the registry)",
                k["cut"] == 0 and k["handed_off"] == k["streams"],
            )
        )
    return out


def write_report(results: dict[str, Any], out_dir: Path, s: Settings) -> Path:
    lines = ["# Aube benchmark results", ""]
    lines.append(
        "Generated by `make bench` (bench/run.py"
        + (", smoke settings: numbers mean nothing" if s.smoke else "")
        + "). "
        f"Every configuration ran interleaved with the others, {s.reps} repetition(s); figures are medians over the "
        "repetitions, and every comparison is a ratio from the same run. Method: bench/README.md."
    )
    lines += ["", "## Machine", "", "| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in results["machine"].items()]
    lines += ["", "## Targets", "", "| target | measured | met |", "| --- | --- | --- |"]
    for name, measured, met in targets_of(results):
        lines.append(f"| {name} | {measured} | {'yes' if met else ('n/a' if met is None else '**no**')} |")
    dp = results.get("datapath")
    if dp:
        lines += [
            "",
            "## 1. Data path (echo round trips)",
            "",
            f"{s.duration:g} s measured per run after {s.warmup:g} s warm-up; closed loop per stream. Proxy CPU is "
            "utime+stime of the proxy process (nginx: master + workers) over the window, divided by round trips. "
            "The load generator's CPU is shown too (100% = one core).",
            "",
            "| size | streams | path | round trips/s | p50 µs | p99 µs | proxy CPU µs/rt | loadgen CPU % "
            "| loadgen µs/rt |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in dp["table"]:
            lines.append(
                f"| {r['size']} B | {r['streams']} | {r['config']} | {fmt(r['rt_per_s'])} | {fmt(r['p50_us'])} | "
                f"{fmt(r['p99_us'])} | {fmt(r['proxy_cpu_us_per_rt'], 1)} | {fmt(r['loadgen_cpu_pct'])} | "
                f"{fmt(r['loadgen_cpu_us_per_rt'], 1)} |"
            )
        lines += ["", "![chart](results.png)"]
    su = results.get("setup")
    if su:
        lines += section_setup(su)
    mem = results.get("memory")
    if mem:
        lines += section_per_stream(mem, results.get("kill"))
    if results.get("cold"):
        lines += [
            "",
            "## 3. Cold start",
            "",
            "Scale request to the first echoed message on the new instance, against the floor: a bare start of the "
            "same server (`python -m aube.instance`; for Docker the same image through the Engine API, as `docker "
            "run -d -p`) until its port answers. The process runtime runs with its zygote (the default as root: each "
            "instance forked into its own sandbox) and without (`AUBE_ZYGOTE=off`: a fresh interpreter per "
            "instance); both against a bare `python -c pass` too.",
            "",
            "| runtime | Aube: scale → first echo ms | of which scale reply ms | floor: start → port answers ms | "
            "floor → first echo ms | ratio | bare `python -c pass` ms | ratio to it |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for c in results["cold"]:
            python = c.get("python_s")
            lines.append(
                f"| {c['runtime']} | {c['aube_s'] * 1000:.0f} | {c['aube_scale_reply_s'] * 1000:.0f} | "
                f"{c['floor_port_s'] * 1000:.0f} | {c['floor_echo_s'] * 1000:.0f} | {c['ratio']:.2f}x | "
                f"{fmt(python * 1000 if python else None)} | "
                f"{fmt(c.get('ratio_python'), 2) + 'x' if python else '-'} |"
            )
    for key in ("burst", "docker_burst"):
        if results.get(key):
            lines += section_burst(results[key])
    if results.get("upload"):
        lines += [
            "",
            "## 5. Upload to ready",
            "",
            "Upload request to its reply (function built, an instance health-checked and free). First upload of a "
            "new name (cold function image; the base and runtime images already exist), then a re-upload of changed "
            "code (cached layers).",
            "",
            "| runtime | first upload s | re-upload s |",
            "| --- | --- | --- |",
        ]
        for u in results["upload"]:
            lines.append(f"| {u['runtime']} | {u['first_s']:.2f} | {u['reupload_s']:.2f} |")
    prof = results.get("profile")
    if prof:
        lines += ["", "## 6. Where the proxy's time goes", ""]
        if "error" in prof:
            lines.append(f"py-spy could not record here: `{prof['error']}`")
        else:
            lines += [
                f"py-spy (`record --native --rate 100`, {prof['samples']} samples; it pauses the process to sample, "
                "so the proxy is slower while profiled) of the proxy relaying 64 KiB round trips on "
                "one stream; own time by innermost frame (full stacks: bench/profile-proxy.txt):",
                "",
                "| % of samples | frame |",
                "| --- | --- |",
            ]
            lines += [f"| {pct:.1f} | `{frame[:110]}` |" for frame, pct in prof["top"]]
    lines += ["", *results.get("notes", [])]
    notes = BENCH / "NOTES.md"  # a reading of the misses, written by hand after looking at a full run
    if not s.smoke and notes.exists():
        lines += ["", notes.read_text().strip()]
    path = out_dir / "RESULTS.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def chart(results: dict[str, Any], out_dir: Path) -> Path | None:
    dp = results.get("datapath")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no chart")
        return None
    if not dp:
        return None
    groups = [(r["size"], r["streams"]) for r in dp["table"] if r["config"] == "direct"]
    configs = dp["configs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / len(configs)
    colors = {
        "direct": "#4c72b0",
        "relay": "#dd8452",
        "relay-python": "#937860",
        "handoff": "#8172b3",
        "nginx-stock": "#55a868",
        "nginx-tuned": "#c44e52",
    }
    for i, config in enumerate(configs):
        rows = {(r["size"], r["streams"]): r for r in dp["table"] if r["config"] == config}
        xs = [g + i * width for g in range(len(groups))]
        ax1.bar(xs, [rows[g]["rt_per_s"] or 0 for g in groups], width, label=config, color=colors.get(config))
        if config != "direct":
            cpu = [rows[g]["proxy_cpu_us_per_rt"] or 0 for g in groups]
            ax2.bar(xs, cpu, width, label=config, color=colors.get(config))
    labels = [f"{'64 KiB' if sz == 65536 else f'{sz} B'} x{st}" for sz, st in groups]
    for ax, title in (
        (ax1, "round trips per second (higher is better)"),
        (ax2, "proxy CPU µs per round trip (lower is better)"),
    ):
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], labels)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    path = out_dir / "results.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def nginx_version() -> str:
    try:
        out = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False)
        return out.stderr.strip().removeprefix("nginx version: ")
    except OSError:
        return "not installed"


def section_setup(su: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## 2. Stream setup (warm pool)",
        "",
        "Connect, upgrade, first 64 B echo; sequential, one client. `direct` rotates over free instances. `relay` and "
        "`handoff` go through their proxy (added = the path's figure minus direct's).",
        "",
        "| path | p50 ms | p95 ms | p99 ms | p50 added ms | p95 added ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    added50, added95 = su.get("added_p50_ms", {}), su.get("added_p95_ms", {})
    for c, v in su["setup"].items():
        lines.append(
            f"| {c} | {v['p50_ms']:.2f} | {fmt(v.get('p95_ms'), 2)} | {v['p99_ms']:.2f} | "
            f"{fmt(added50.get(c), 2)} | {fmt(added95.get(c), 2)} |"
        )
    lines += [
        "",
        f"Stream setups per second through one proxy replica ({su['setups_parallel']} clients looping connect, echo, "
        "close), and the proxy's CPU per stream (utime+stime of the proxy process from /proc over the run, divided "
        "by the setups: accept, claim, connect or hand over, and the release after the close):",
        "",
        "| path | setups/s | proxy CPU µs per stream | errors |",
        "| --- | --- | --- | --- |",
    ]
    for c, rate in su["setups_per_s"].items():
        lines.append(f"| {c} | {rate:.0f} | {su['proxy_cpu_us_per_setup'][c]:,.0f} | {su['setups_errors'][c]} |")
    return lines


def section_per_stream(mem: dict[str, Any], kill: dict[str, Any] | None) -> list[str]:
    lines = [
        "",
        "## 2b. Per open stream, and a proxy killed during handed-off streams",
        "",
        f"Proxy memory per open stream: a fresh proxy replica's VmRSS with {mem['streams']} streams open (each echoed "
        "once) minus its VmRSS after one stream opened and closed, divided by the streams less one "
        "(bench/perstream.py; a replica that carried as many streams before reuses their memory and shows no growth).",
        "",
        "| path | KiB per open stream (median) | samples |",
        "| --- | --- | --- |",
    ]
    for c, kib in mem["kib_per_stream"].items():
        samples = ", ".join(f"{x:.1f}" for x in mem["samples_kib"][c])
        lines.append(f"| {c} | {kib:.1f} | {samples} |")
    if kill:
        lines += [
            "",
            f"kill -9 of the handoff proxy with {kill['streams']} handed-off streams open "
            f"({kill['handed_off']} flagged `handed_off` in the registry just before): each stream then sent 3 "
            f"messages and waited for their echoes, from 1 s after the kill. **{kill['cut']} cut** "
            f"(checked within {kill['checked_after_s']:.1f} s of the kill).",
        ]
        if kill["errors"]:
            lines += ["", f"Errors: `{kill['errors']}`"]
    return lines


def section_burst(b: dict[str, Any]) -> list[str]:
    runtime = b.get("runtime", "process")
    lines = [
        "",
        f"## 4. Burst ({runtime})",
        "",
        f"{b['clients']} clients connect at once through one proxy (relaying) to a function with `min_free = 2` "
        f"({runtime} runtime, `max_instances = {b['clients']}`, default claim timeout). Each holds its stream until "
        "all are served.",
        "",
        "| last client served, median s (all only where served = clients) | first served s | served per rep "
        "| rejected per rep |",
        "| --- | --- | --- | --- |",
        f"| {b['all_served_s']:.2f} | {b['first_served_s']:.3f} | {b['served']} | {b['rejected']} |",
    ]
    if b["errors"]:
        lines += ["", f"Errors: `{b['errors']}`"]
    return lines
