"""Aube's benchmarks in one command: `make bench` (full, several minutes) or `make bench-smoke` (seconds).

    .venv/bin/python bench/run.py [--smoke] [--out DIR] [--no-docker] [--no-nginx]

Starts the real platform as processes (a LocalNatsServer, `python -m aube.controlplane`, `python -m aube.proxy`)
on 127.0.0.1, uploads bench/echo, and measures the scenarios of bench/README.md. Clients are bench/loadgen.py
processes. Every configuration of a scenario runs interleaved with the others, `reps` times; tables show medians
over the repetitions. Writes RESULTS.md, results.json and results.png (with matplotlib) to the output folder.
Everything started is stopped at the end: services, nginx (own prefix and config), labelled containers, images.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # bench/ is a folder of scripts, not a package
sys.path.insert(1, str(BENCH.parent / "tests"))  # the platform harness the tests run on too (tests/harness.py)
import harness  # noqa: E402
import perstream  # noqa: E402
from coldstart import cold_process, scenario_cold  # noqa: E402
from common import (  # noqa: E402
    CREDENTIALS,
    PY,
    Settings,
    Stack,
    delete,
    free_addresses,
    loadgen,
    log,
    manifest,
    median,
    rotate,
    upload,
    wait_until,
)
from harness import http_status  # noqa: E402
from report import chart, load_average, machine, write_report  # noqa: E402

from aube.shared import names  # noqa: E402
from aube.shared.natsserver import free_port  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# nginx


NGINX_TUNING = "proxy_buffer_size 256k; proxy_buffers 4 256k; proxy_busy_buffers_size 256k;"


class Nginx:
    """A private nginx (own prefix, config, pid and temp folders); never the system service."""

    def __init__(self, work: Path, label: str, upstreams: list[str], tuned: bool) -> None:
        self.prefix = work / f"nginx-{label}"
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        # A location's own proxy_set_header replaces the server's, so the upgrade lines are repeated next to the
        # instance credential nginx presents in the proxy's place.
        locations = "\n".join(
            f"        location = /i{i} {{ proxy_pass http://{addr}; proxy_set_header Upgrade $http_upgrade; "
            f'proxy_set_header Connection "upgrade"; '
            f'proxy_set_header {names.HEADER_INSTANCE_SECRET} "{CREDENTIALS.get(addr, "")}"; }}'
            for i, addr in enumerate(upstreams)
        )
        # Debian's stock nginx.conf: worker_processes auto, sendfile, tcp_nopush, keepalive 65; the WebSocket
        # lines are the minimum nginx's documentation gives for proxying an upgrade. Access logs are off in both.
        conf = f"""
worker_processes auto;
pid {self.prefix}/nginx.pid;
error_log {self.prefix}/error.log warn;
daemon off;
events {{ worker_connections 768; }}
http {{
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    access_log off;
    client_body_temp_path {self.prefix}/client_body;
    proxy_temp_path {self.prefix}/proxy;
    fastcgi_temp_path {self.prefix}/fastcgi;
    uwsgi_temp_path {self.prefix}/uwsgi;
    scgi_temp_path {self.prefix}/scgi;
    server {{
        listen 127.0.0.1:{self.port};
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection "upgrade";
        proxy_read_timeout 3600s;
        {NGINX_TUNING if tuned else ""}
{locations}
    }}
}}
"""
        conf_path = self.prefix / "nginx.conf"
        conf_path.write_text(conf)
        self.proc = subprocess.Popen(
            ["nginx", "-p", str(self.prefix), "-e", str(self.prefix / "error.log"), "-c", str(conf_path)],
            stdout=subprocess.DEVNULL,
            stderr=(self.prefix / "stderr.log").open("wb"),
        )
        wait_until(lambda: http_status("127.0.0.1", self.port, "/nothing") is not None, 10, f"nginx {label}", 0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, master removes its pid file
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------------------------------------------
# Scenarios


def scenario_datapath(
    s: Settings, stack: Stack, hand: Stack, work: Path, stop: ExitStack, python_relay: Stack | None = None
) -> dict[str, Any]:
    """Echo round trips on each path. `stack` (instances on loopback TCP) serves direct, relay and both nginx;
    `hand` (sandboxed instances, whose socket folders take handoffs) serves the handoff path through its proxy;
    `python_relay` (like `stack`, its own platform) relays in the event loop's protocols, not the native engine."""
    n = max(s.streams)
    log(f"data path: uploading echo with {n} warm instances on each platform")
    anyio.run(upload, stack, "echo", manifest(n, n))
    anyio.run(upload, hand, "echo", manifest(n, n))
    addrs = anyio.run(free_addresses, stack, "echo", n)
    anyio.run(free_addresses, hand, "echo", n)
    assert stack.proxy is not None
    assert hand.proxy is not None
    configs = ["direct", "relay", "handoff"]
    proxies = {"relay": stack, "handoff": hand}
    if python_relay is not None:
        anyio.run(upload, python_relay, "echo", manifest(n, n))
        anyio.run(free_addresses, python_relay, "echo", n)
        configs.insert(2, "relay-python")
        proxies["relay-python"] = python_relay
    nginxes: dict[str, Nginx] = {}
    if s.nginx:
        for label, tuned in (("nginx-stock", False), ("nginx-tuned", True)):
            nginxes[label] = Nginx(work, label, addrs, tuned)
            stop.callback(nginxes[label].stop)
            configs.append(label)

    def targets(config: str, streams: int) -> list[str]:
        if config == "direct":
            return [f"{a}/echo" for a in addrs[:streams]]
        if config in proxies:
            return [f"127.0.0.1:{proxies[config].proxy_port}/echo"] * streams
        return [f"127.0.0.1:{nginxes[config].port}/i{i}" for i in range(streams)]

    def watch(config: str) -> list[str]:
        if config in proxies:
            proxy = proxies[config].proxy
            assert proxy is not None
            return ["--watch", f"proxy={proxy.pid}"]
        if config in nginxes:
            return ["--watch-tree", f"proxy={nginxes[config].proc.pid}"]
        return []

    runs: list[dict[str, Any]] = []
    for size in s.sizes:
        for streams in s.streams:
            for rep in range(s.reps):
                for config in rotate(configs, rep):
                    r = loadgen(
                        "rt",
                        *targets(config, streams),
                        "--size",
                        str(size),
                        "--warmup",
                        str(s.warmup),
                        "--duration",
                        str(s.duration),
                        *watch(config),
                    )
                    r.update(config=config, rep=rep)
                    proxy_cpu = r["watched_cpu_s"].get("proxy")
                    rts = r["round_trips"] or 1
                    r["proxy_cpu_us_per_rt"] = None if proxy_cpu is None else proxy_cpu * 1e6 / rts
                    r["loadgen_cpu_pct"] = 100 * r["loadgen_cpu_s"] / r["elapsed"]
                    r["loadgen_cpu_us_per_rt"] = r["loadgen_cpu_s"] * 1e6 / rts
                    runs.append(r)
                    log(
                        f"  {size:>6} B x{streams:<2} {config:<12} {r['rt_per_s']:8.0f} rt/s "
                        f"p50 {r['p50_us']:7.0f} us p99 {r['p99_us']:7.0f} us proxy "
                        f"{r['proxy_cpu_us_per_rt'] or 0:6.1f} us/rt loadgen {r['loadgen_cpu_pct']:4.0f}%"
                    )
    table = []
    for size in s.sizes:
        for streams in s.streams:
            for config in configs:
                sel = [r for r in runs if r["size"] == size and r["streams"] == streams and r["config"] == config]

                def med(key: str, sel: list[dict[str, Any]] = sel) -> float | None:
                    vals = [r[key] for r in sel if r[key] is not None]
                    return median(vals) if vals else None

                table.append(
                    {
                        "size": size,
                        "streams": streams,
                        "config": config,
                        "rt_per_s": med("rt_per_s"),
                        "p50_us": med("p50_us"),
                        "p99_us": med("p99_us"),
                        "proxy_cpu_us_per_rt": med("proxy_cpu_us_per_rt"),
                        "loadgen_cpu_pct": med("loadgen_cpu_pct"),
                        "loadgen_cpu_us_per_rt": med("loadgen_cpu_us_per_rt"),
                    }
                )
    return {"configs": configs, "runs": runs, "table": table, "addresses": addrs, "nginx": bool(nginxes)}


def scenario_setup(s: Settings, stack: Stack, hand: Stack, addrs: list[str]) -> dict[str, Any]:
    """Sequential setups (connect, upgrade, first echo) by relay, by handoff and direct; then setups per second
    through each proxy with the proxy's CPU per setup (from accept to the release after the close)."""
    proxies = {"relay": stack, "handoff": hand}
    log("stream setup: connect to first echo, relay and handoff vs direct")
    per: dict[str, list[dict[str, Any]]] = {"relay": [], "handoff": [], "direct": []}
    for rep in range(s.reps):
        for config in rotate(list(per), rep):
            if config == "direct":
                targets = [f"{a}/echo" for a in addrs]
            else:
                targets = [f"127.0.0.1:{proxies[config].proxy_port}/echo"]
            per[config].append(loadgen("setup", *targets, "--count", str(s.setup_count)))
    rates: dict[str, list[dict[str, Any]]] = {"relay": [], "handoff": []}
    for rep in range(s.reps):
        for config in rotate(list(rates), rep):
            proxy = proxies[config].proxy
            assert proxy is not None
            r = loadgen(
                "setups",
                f"127.0.0.1:{proxies[config].proxy_port}/echo",
                "--parallel",
                str(s.setups_parallel),
                "--duration",
                str(s.setups_duration),
                "--watch",
                f"proxy={proxy.pid}",
            )
            r["proxy_cpu_us_per_setup"] = r["watched_cpu_s"]["proxy"] * 1e6 / max(1, r["setups"])
            rates[config].append(r)
    out = {
        c: {"p50_ms": median([r["p50_ms"] for r in rs]), "p95_ms": median([r["p95_ms"] for r in rs]),
            "p99_ms": median([r["p99_ms"] for r in rs])}
        for c, rs in per.items()
    }  # fmt: skip
    direct = out["direct"]
    result = {
        "setup": out,
        "added_p50_ms": {c: out[c]["p50_ms"] - direct["p50_ms"] for c in proxies},
        "added_p95_ms": {c: out[c]["p95_ms"] - direct["p95_ms"] for c in proxies},
        "setups_per_s": {c: median([r["setups_per_s"] for r in rs]) for c, rs in rates.items()},
        "proxy_cpu_us_per_setup": {c: median([r["proxy_cpu_us_per_setup"] for r in rs]) for c, rs in rates.items()},
        "setups_parallel": s.setups_parallel,
        "setups_errors": {c: sum(len(r["errors"]) for r in rs) for c, rs in rates.items()},
    }
    log(f"  {result}")
    return result


def scenario_burst(s: Settings, stack: Stack, reps: int) -> dict[str, Any]:
    log(f"burst on {stack.runtime}: {s.burst_clients} clients at once, min_free = 2")
    runs = []
    for rep in range(reps):
        name = f"burst{rep}"
        anyio.run(upload, stack, name, manifest(2, max(s.burst_clients, 2)))
        anyio.run(free_addresses, stack, name, 2)
        r = loadgen("burst", f"127.0.0.1:{stack.proxy_port}/{name}", "--clients", str(s.burst_clients))
        log(f"  rep {rep}: served {r['served']} rejected {r['rejected']} all in {r['all_served_s']:.2f} s")
        runs.append(r)
        anyio.run(delete, stack, name)
    return {
        "runtime": stack.runtime,
        "clients": s.burst_clients,
        "all_served_s": median([r["all_served_s"] for r in runs]),
        "first_served_s": median([r["first_served_s"] for r in runs]),
        "served": [r["served"] for r in runs],
        "rejected": [r["rejected"] for r in runs],
        "errors": [e for r in runs for e in r["errors"]][:5],
    }


def scenario_upload(s: Settings, stack: Stack) -> dict[str, Any]:
    log(f"upload to ready on {stack.runtime}")
    first: list[float] = []
    again: list[float] = []
    for rep in range(s.upload_reps):
        name = f"up{rep}-{uuid.uuid4().hex[:4]}"
        t, _ = anyio.run(upload, stack, name, manifest(1, 2))
        first.append(t)
        t2, _ = anyio.run(upload, stack, name, manifest(1, 2), f"\n# changed {rep}\n")
        again.append(t2)
        anyio.run(delete, stack, name)
    result = {"runtime": stack.runtime, "first_s": median(first), "reupload_s": median(again)}
    log(f"  {result}")
    return result


def profile_proxy(s: Settings, stack: Stack, work: Path) -> dict[str, Any] | None:
    """py-spy record of the proxy while it relays 64 KiB round trips on one stream."""
    pyspy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if s.profile_seconds <= 0 or not Path(pyspy).exists() or stack.proxy is None:
        return None
    log("profiling the proxy under load with py-spy")
    raw = work / "proxy-profile.txt"
    spy = subprocess.Popen(
        [pyspy, "record", "--pid", str(stack.proxy.pid), "--format", "raw", "--rate", "100", "--native",
         "--duration", str(round(s.profile_seconds)), "-o", str(raw)],
        stdout=subprocess.DEVNULL,
        stderr=(work / "py-spy.log").open("wb"),
    )  # fmt: skip
    time.sleep(0.5)
    loadgen("rt", f"127.0.0.1:{stack.proxy_port}/echo", "--size", "65536", "--duration", str(s.profile_seconds))
    try:
        spy.wait(60)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()
    if not raw.exists():
        return {"error": (work / "py-spy.log").read_text(errors="replace")[-800:]}
    own: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        leaf = stack_text.split(";")[-1]
        own[leaf] = own.get(leaf, 0) + n
    top = sorted(own.items(), key=lambda kv: -kv[1])[:15]
    shutil.copy(raw, BENCH / "profile-proxy.txt") if not s.smoke else None
    return {"samples": total, "top": [(frame, n / total * 100) for frame, n in top]}


# ---------------------------------------------------------------------------------------------------------------


def docker_or_none() -> Any:
    try:
        import docker

        client = docker.from_env(timeout=60)
        client.ping()
        return client
    except Exception as e:
        log(f"no Docker engine ({e}): Docker scenarios skipped")
        return None


def relay_and_handoff(work: Path, owner: str, stop: ExitStack) -> tuple[Stack, Stack]:
    """The two platforms the data path and setup scenarios compare, each ready with its proxy: one relaying, one
    handing sockets over. Handoff needs the instance's socket folder, which only a sandboxed process instance has
    (docs/handoff.md): its own platform and owner."""
    proc = Stack(work, "process", owner, stop)
    hand = Stack(work, "process", f"{owner}h", stop, "handoff", AUBE_SANDBOX="bwrap")
    anyio.run(proc.wait_ready)
    anyio.run(hand.wait_ready)
    proc.start_proxy(AUBE_HANDOFF="off", AUBE_RELAY_ENGINE="native")  # fails to start where the engine is not built
    hand.start_proxy(AUBE_HANDOFF="auto")
    return proc, hand


def python_relay(work: Path, owner: str, stop: ExitStack) -> Stack:
    """A relaying platform whose proxy keeps the bytes in the event loop (AUBE_RELAY_ENGINE=python): the relay before
    the native engine, measured in the same run."""
    py = Stack(work, "process", f"{owner}p", stop, "relay-python")
    anyio.run(py.wait_ready)
    py.start_proxy(AUBE_HANDOFF="off", AUBE_RELAY_ENGINE="python")
    return py


def run(s: Settings, out_dir: Path, keep: bool = False) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="aube-bench-"))
    owner = f"bench{uuid.uuid4().hex[:8]}"
    results: dict[str, Any] = {"machine": machine(), "settings": s.__dict__, "notes": []}
    nginx_ok = s.nginx and shutil.which("nginx") is not None
    if s.nginx and not nginx_ok:
        results["notes"].append("nginx is not installed: its configurations were skipped.")
    s = Settings(**{**s.__dict__, "nginx": nginx_ok})
    docker_client = docker_or_none() if s.docker else None
    log(f"work folder {work}, owner {owner}")
    try:
        with ExitStack() as stop:
            proc, hand = relay_and_handoff(work, owner, stop)
            dp = scenario_datapath(s, proc, hand, work, stop, python_relay(work, owner, stop))
            results["datapath"] = dp
            results["setup"] = scenario_setup(s, proc, hand, dp["addresses"])
            results["memory"] = perstream.memory_per_stream(
                s, {"relay": (proc, {"AUBE_HANDOFF": "off"}), "handoff": (hand, {"AUBE_HANDOFF": "auto"})}
            )
            # Last on the handoff platform: it leaves that platform without its proxy.
            results["kill"] = perstream.kill_during_handoff(s, hand)
            results["profile"] = profile_proxy(s, proc, work)
            # The same runtime without a zygote, on a platform (and owner) of its own, for the comparison.
            results["cold"] = cold_process(s, work, owner, stop)
            results["burst"] = scenario_burst(s, proc, s.burst_reps)
            results["upload"] = [scenario_upload(s, proc)]
            if docker_client is not None:
                try:
                    dock = Stack(work, "docker", owner, stop)
                    anyio.run(dock.wait_ready)
                    dock.start_proxy(AUBE_HANDOFF="off")
                    results["upload"].append(scenario_upload(s, dock))
                    results["cold"].append(scenario_cold(s, dock, work, docker_client))
                    results["docker_burst"] = scenario_burst(s, dock, s.docker_burst_reps)
                except Exception as e:  # the process-runtime results still get reported
                    log(f"Docker scenarios failed: {e!r}")
                    results["notes"].append(f"The Docker scenarios failed: `{e!r}`.")
    finally:
        if docker_client is not None:
            harness.remove_labelled(docker_client, owner)
            docker_client.close()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    results["machine"]["load average (1, 5, 15 min) at the end"] = load_average()
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    write_report(results, out_dir, s)
    chart(results, out_dir)
    log(f"wrote {out_dir / 'RESULTS.md'}")
    return results


def profile_only(s: Settings) -> dict[str, Any] | None:
    work = Path(tempfile.mkdtemp(prefix="aube-bench-"))
    try:
        with ExitStack() as stop:
            proc = Stack(work, "process", f"bench{uuid.uuid4().hex[:8]}", stop)
            anyio.run(proc.wait_ready)
            proc.start_proxy()
            anyio.run(upload, proc, "echo", manifest(1, 2))
            anyio.run(free_addresses, proc, "echo", 1)
            return profile_proxy(s, proc, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cold_only(s: Settings, out_dir: Path) -> None:
    """Only the process cold start (with and without the zygote, and both floors) into OUT/results.json; the
    other scenarios' results there, Docker's cold start included, are kept."""
    work = Path(tempfile.mkdtemp(prefix="aube-bench-"))
    owner = f"bench{uuid.uuid4().hex[:8]}"
    path = out_dir / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"machine": machine(), "notes": []}
    results.setdefault("settings", s.__dict__)  # the full run's, which the rest of the report describes
    try:
        with ExitStack() as stop:
            cold = cold_process(s, work, owner, stop)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["cold"] = cold + [c for c in results.get("cold", []) if c["runtime"] == "docker"]
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))
    write_report(results, out_dir, Settings(**results["settings"]))


def one_scenario(
    s: Settings, out_dir: Path, key: str, section: str, flag: str, measure: Callable[[Path, str, ExitStack], Any]
) -> None:
    """Run one scenario alone (`measure(work, owner, stop)`) into OUT/results.json under `key`; the other scenarios'
    results there are kept, and the notes say which section came from a later run. For working on one path without
    the whole run."""
    work = Path(tempfile.mkdtemp(prefix="aube-bench-"))
    owner = f"bench{uuid.uuid4().hex[:8]}"
    path = out_dir / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"machine": machine(), "notes": []}
    results.setdefault("settings", s.__dict__)
    load_at_start = load_average()
    try:
        with ExitStack() as stop:
            results[key] = measure(work, owner, stop)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    note = f"{section} and its target rows are from a later run of that scenario alone, {when}"
    note += f" (`bench/run.py {flag}`, load average at its start {load_at_start})."
    results["notes"] = [n for n in results.get("notes", []) if not n.startswith(section)] + [note]
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))
    write_report(results, out_dir, Settings(**results["settings"]))
    chart(results, out_dir)


def datapath_only(s: Settings, out_dir: Path) -> None:
    """Only the data path scenario (every path, the relay-python platform included)."""
    s = Settings(**{**s.__dict__, "nginx": s.nginx and shutil.which("nginx") is not None})

    def measure(work: Path, owner: str, stop: ExitStack) -> dict[str, Any]:
        proc, hand = relay_and_handoff(work, owner, stop)
        return scenario_datapath(s, proc, hand, work, stop, python_relay(work, owner, stop))

    one_scenario(s, out_dir, "datapath", "Section 1 (data path)", "--datapath-only", measure)


def setup_only(s: Settings, out_dir: Path) -> None:
    """Only the stream setup scenario (relay, handoff, direct)."""
    n = max(s.streams)

    def measure(work: Path, owner: str, stop: ExitStack) -> dict[str, Any]:
        proc, hand = relay_and_handoff(work, owner, stop)
        anyio.run(upload, proc, "echo", manifest(n, n))
        anyio.run(upload, hand, "echo", manifest(n, n))
        addrs = anyio.run(free_addresses, proc, "echo", n)
        anyio.run(free_addresses, hand, "echo", n)
        return scenario_setup(s, proc, hand, addrs)

    one_scenario(s, out_dir, "setup", "Section 2 (stream setup)", "--setup-only", measure)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few seconds, tiny counts (CI): numbers mean nothing")
    p.add_argument("--out", type=Path, default=None, help="output folder (default bench/, smoke: a temp folder)")
    p.add_argument("--no-docker", action="store_true")
    p.add_argument("--no-nginx", action="store_true")
    p.add_argument("--docker", action="store_true", help="smoke only: include the Docker scenarios")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs) for inspection")
    p.add_argument("--profile-only", action="store_true", help="add a fresh proxy profile to OUT/results.json")
    p.add_argument("--report-from", type=Path, help="only rewrite RESULTS.md and the chart from a results.json")
    p.add_argument("--cold-only", action="store_true", help="only the process cold start, into OUT/results.json")
    p.add_argument("--setup-only", action="store_true", help="only the stream setup, into OUT/results.json")
    p.add_argument("--datapath-only", action="store_true", help="only the data path, into OUT/results.json")
    args = p.parse_args(argv)
    if args.report_from:
        results = json.loads(args.report_from.read_text())
        out_dir = args.out or args.report_from.parent
        write_report(results, out_dir, Settings(**results["settings"]))
        chart(results, out_dir)
        return
    if args.cold_only:
        settings = Settings.smoke_run(False, False) if args.smoke else Settings.full(False, False)
        cold_only(settings, args.out or BENCH)
        return
    if args.setup_only:
        settings = Settings.smoke_run(False, False) if args.smoke else Settings.full(False, False)
        setup_only(settings, args.out or BENCH)
        return
    if args.datapath_only:
        nginx_on = not args.no_nginx
        settings = Settings.smoke_run(False, nginx_on) if args.smoke else Settings.full(False, nginx_on)
        datapath_only(settings, args.out or BENCH)
        return
    if args.profile_only:
        out_dir = args.out or BENCH
        results = json.loads((out_dir / "results.json").read_text())
        settings = Settings(**results["settings"])
        results["profile"] = profile_only(settings)
        (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
        write_report(results, out_dir, settings)
        return
    docker_on, nginx_on = not args.no_docker, not args.no_nginx
    # The smoke leaves Docker out unless asked (--docker): an image build does not fit in its few seconds.
    s = Settings.smoke_run(args.docker, nginx_on) if args.smoke else Settings.full(docker_on, nginx_on)
    out = args.out or (Path(tempfile.mkdtemp(prefix="aube-bench-out-")) if args.smoke else BENCH)
    run(s, out, args.keep)


if __name__ == "__main__":
    main()
