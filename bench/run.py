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
import functools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from aube.shared import names
from aube.shared.bus import request
from aube.shared.errors import AubeError, UnknownFunction
from aube.shared.natsserver import LocalNatsServer, free_port
from aube.shared.registry import Registry
from aube.shared.schemas import (
    DeleteReply,
    DeleteRequest,
    ScaleReply,
    ScaleRequest,
    StopInstanceReply,
    StopInstanceRequest,
    UploadReply,
    UploadRequest,
)

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
LOADGEN = BENCH / "loadgen.py"
ECHO = BENCH / "echo"
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")

sys.path.insert(0, str(BENCH))  # bench/ is a folder of scripts, not a package
sys.path.insert(1, str(REPO / "tests"))  # the platform harness the tests run on too (tests/harness.py)
import harness  # noqa: E402
import loadgen as lg  # noqa: E402
from harness import http_status  # noqa: E402

# The services' settings in a benchmark run, beyond the harness's own. Direct connections are the baseline:
# instances on loopback TCP, which sandboxed process instances (no network; a Unix socket) are not. The sandbox is
# not what these figures are about.
SERVICE_ENV = {"AUBE_LOG_LEVEL": "INFO", "AUBE_HEALTH_TIMEOUT": "120", "AUBE_SANDBOX": "none"}

# Instance credentials by address, for the baselines that dial instances straight (direct, nginx): instances answer
# the platform only, and these stand in for the proxy. Filled from the registry as instances are found.
CREDENTIALS: dict[str, str] = {}


@dataclass(frozen=True)
class Settings:
    smoke: bool
    reps: int
    duration: float  # seconds per data-path measurement window
    warmup: float
    sizes: tuple[int, ...]
    streams: tuple[int, ...]
    setup_count: int  # sequential setups per repetition and configuration
    setups_parallel: int
    setups_duration: float
    cold_reps: int
    burst_clients: int
    burst_reps: int
    upload_reps: int
    profile_seconds: float
    docker: bool
    nginx: bool

    @classmethod
    def full(cls, docker: bool, nginx: bool) -> Settings:
        return cls(False, 3, 3.0, 0.5, (64, 65536), (1, 16), 100, 4, 3.0, 5, 50, 3, 3, 6.0, docker, nginx)

    @classmethod
    def smoke_run(cls, docker: bool, nginx: bool) -> Settings:
        return cls(True, 1, 0.3, 0.1, (64, 65536), (1, 2), 5, 2, 0.5, 1, 5, 1, 1, 0.0, docker, nginx)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# Processes


class Stack:
    """One platform: its own nats-server, a control plane on one runtime, optionally a proxy replica (harness.py)."""

    def __init__(self, work: Path, runtime: str, owner: str, stack: ExitStack, label: str = "", **env: str) -> None:
        self.runtime = runtime
        self.label = label or runtime  # how the report names it ("process (no zygote)")
        self.owner = owner
        self.nats = stack.enter_context(LocalNatsServer())
        folder = work / self.label.replace(" ", "-").replace("(", "").replace(")", "")
        self.platform = harness.Platform(self.nats.url, owner, runtime, folder, env_defaults={**SERVICE_ENV, **env})
        self.work = self.platform.tmp
        stack.callback(self.platform.stop_all, show_logs=False)
        self.controlplane = self.platform.start("aube.controlplane")
        self.proxy: harness.ServiceProcess | None = None
        self.proxy_port = 0

    def start_proxy(self) -> None:
        port = free_port()
        start = functools.partial(self.platform.start_proxy, AUBE_PROXY_PORT=str(port), AUBE_PROXY_ID=f"bench-{port}")
        self.proxy_port, self.proxy = anyio.run(start)

    async def wait_ready(self) -> None:
        await self.platform.wait_ready(self.controlplane)

    def client(self) -> AbstractAsyncContextManager[tuple[Any, Registry]]:
        return harness.nats_client(self.nats.url)


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.002) -> float:
    t0 = time.perf_counter()
    while True:
        if check():
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


def loadgen(*args: str, timeout: float = 300) -> dict[str, Any]:
    env = {**os.environ, "AUBE_BENCH_CREDENTIALS": json.dumps(CREDENTIALS)}
    out = subprocess.run(
        [PY, str(LOADGEN), *args], capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    if out.returncode != 0:
        raise RuntimeError(f"loadgen {' '.join(args[:3])} failed: {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def manifest(min_free: int, max_instances: int) -> str:
    # Both cores for the echo instance: the data path measures the proxy, so the echo must not be throttled by the
    # default limit of half a core (which both runtimes enforce).
    return f"[scaling]\nmin_free = {min_free}\nmax_instances = {max_instances}\n[limits]\ncpus = 2.0\n"


async def upload(stack: Stack, name: str, toml: str, code_suffix: str = "") -> tuple[float, UploadReply]:
    extra = {"aube.toml": toml}
    if code_suffix:
        extra["fn.py"] = (ECHO / "fn.py").read_text() + code_suffix
    body = UploadRequest(name=name, zip=harness.zip_base64(ECHO, extra))
    async with stack.client() as (nc, _):
        t0 = time.perf_counter()
        reply = await request(nc, names.SUBJECT_UPLOAD, body, UploadReply, 900)
        return time.perf_counter() - t0, reply


async def delete(stack: Stack, name: str) -> None:
    """Delete, retrying: a delete racing the proxy's releases of just-closed streams can fail with a CAS error."""
    async with stack.client() as (nc, _):
        for attempt in range(5):
            try:
                await request(nc, names.SUBJECT_DELETE, DeleteRequest(name=name, grace=0), DeleteReply, 120)
                return
            except UnknownFunction:
                return  # an earlier attempt did delete it, and only its reply failed
            except AubeError as e:
                log(f"  delete {name} failed (attempt {attempt + 1}): {e}")
                await anyio.sleep(1)


async def free_addresses(stack: Stack, name: str, want: int, timeout: float = 120) -> list[str]:
    async with stack.client() as (_, registry):
        free = (await harness.wait_free(registry, name, want, timeout))[:want]
    CREDENTIALS.update((e.record.address, e.record.secret) for e in free if e.record.secret)
    return [e.record.address for e in free]


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


def nginx_version() -> str:
    try:
        out = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False)
        return out.stderr.strip().removeprefix("nginx version: ")
    except OSError:
        return "not installed"


# ---------------------------------------------------------------------------------------------------------------
# Scenarios


def rotate(configs: list[str], rep: int) -> list[str]:
    """Interleaving: every repetition runs every configuration, starting one further along each time."""
    k = rep % len(configs)
    return configs[k:] + configs[:k]


def scenario_datapath(s: Settings, stack: Stack, work: Path, stop: ExitStack) -> dict[str, Any]:
    n = max(s.streams)
    log(f"data path: uploading echo with {n} warm instances")
    anyio.run(upload, stack, "echo", manifest(n, n))
    addrs = anyio.run(free_addresses, stack, "echo", n)
    assert stack.proxy is not None
    configs = ["direct", "aube"]
    nginxes: dict[str, Nginx] = {}
    if s.nginx:
        for label, tuned in (("nginx-stock", False), ("nginx-tuned", True)):
            nginxes[label] = Nginx(work, label, addrs, tuned)
            stop.callback(nginxes[label].stop)
            configs.append(label)

    def targets(config: str, streams: int) -> list[str]:
        if config == "direct":
            return [f"{a}/echo" for a in addrs[:streams]]
        if config == "aube":
            return [f"127.0.0.1:{stack.proxy_port}/echo"] * streams
        return [f"127.0.0.1:{nginxes[config].port}/i{i}" for i in range(streams)]

    def watch(config: str) -> list[str]:
        if config == "aube":
            assert stack.proxy is not None
            return ["--watch", f"proxy={stack.proxy.pid}"]
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


def scenario_setup(s: Settings, stack: Stack, addrs: list[str]) -> dict[str, Any]:
    assert stack.proxy is not None
    log("stream setup: connect to first echo, proxy vs direct")
    per: dict[str, list[dict[str, Any]]] = {"aube": [], "direct": []}
    for rep in range(s.reps):
        for config in rotate(["aube", "direct"], rep):
            targets = [f"127.0.0.1:{stack.proxy_port}/echo"] if config == "aube" else [f"{a}/echo" for a in addrs]
            per[config].append(loadgen("setup", *targets, "--count", str(s.setup_count)))
    rates = []
    for _ in range(s.reps):
        r = loadgen(
            "setups",
            f"127.0.0.1:{stack.proxy_port}/echo",
            "--parallel",
            str(s.setups_parallel),
            "--duration",
            str(s.setups_duration),
            "--watch",
            f"proxy={stack.proxy.pid}",
        )
        r["proxy_cpu_us_per_setup"] = r["watched_cpu_s"]["proxy"] * 1e6 / max(1, r["setups"])
        rates.append(r)
    out = {
        c: {"p50_ms": median([r["p50_ms"] for r in rs]), "p99_ms": median([r["p99_ms"] for r in rs])}
        for c, rs in per.items()
    }
    result = {
        "setup": out,
        "added_p50_ms": out["aube"]["p50_ms"] - out["direct"]["p50_ms"],
        "setups_per_s": median([r["setups_per_s"] for r in rates]),
        "proxy_cpu_us_per_setup": median([r["proxy_cpu_us_per_setup"] for r in rates]),
        "setups_parallel": s.setups_parallel,
        "setups_errors": sum(len(r["errors"]) for r in rates),
    }
    log(f"  {result}")
    return result


def first_echo(address: str, timeout: float = 30) -> None:
    """Connect, send one message, wait for its echo (raw frames, as the load generator does)."""
    frame = lg.client_frame(b"x" * 64)
    lg.CREDENTIALS.update(CREDENTIALS)
    if address.startswith("unix:"):  # a sandboxed process instance
        target = lg.Target("instance", 0, "/echo", unix=address.removeprefix("unix:"))
    else:
        host, _, port = address.rpartition(":")
        target = lg.Target(host, int(port), "/echo")
    sock, buf = lg.connect(target, timeout)
    stream = lg.Stream(sock, buf, frame, 64)
    try:
        stream.send()
        while not stream.feed():
            pass
    finally:
        stream.close()


async def aube_cold_start(stack: Stack, name: str) -> dict[str, float]:
    """Scale request -> reply (instance healthy and free) -> first echo on it; then stop it again."""
    async with stack.client() as (nc, registry):
        t0 = time.perf_counter()
        reply = await request(nc, names.SUBJECT_SCALE, ScaleRequest(name=name, count=1), ScaleReply, 120)
        t_reply = time.perf_counter()
        started = reply.started[0]
        # The credential, which a proxy has from its registry watch without asking: not part of the timing.
        looked_up = time.perf_counter()
        entry = await registry.get_instance(names.instance_key(name, started.slot))
        address = started.address
        if entry is not None:
            address = entry.record.address  # a reply shows a Unix socket as "unix" only; the registry has its path
            if entry.record.secret:
                CREDENTIALS[address] = entry.record.secret
        lookup_s = time.perf_counter() - looked_up
        first_echo(address)
        t_echo = time.perf_counter()
        await request(
            nc,
            names.SUBJECT_STOP_INSTANCE,
            StopInstanceRequest(name=name, slot=started.slot, instance_id=started.instance_id, reason="bench"),
            StopInstanceReply,
            60,
        )
    return {"total_s": t_echo - t0 - lookup_s, "scale_reply_s": t_reply - t0}


def bare_process_start(work: Path) -> dict[str, float]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUBE_")}
    env.update(
        AUBE_FN_DIR=str(ECHO),
        AUBE_INSTANCE_HOST="127.0.0.1",
        AUBE_INSTANCE_PORT=str(port),
        AUBE_FUNCTION="echo",
        AUBE_INSTANCE_ID="bare",
        AUBE_VERSION="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    with (work / "bare-process.log").open("ab") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([PY, "-m", "aube.instance"], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            up = wait_until(lambda: http_status("127.0.0.1", port, names.INSTANCE_HEALTH_PATH) == 200, 60, "bare")
            first_echo(f"127.0.0.1:{port}")
            echo = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(10)
    return {"port_s": up, "echo_s": echo}


def bare_docker_start(client: Any, image: str, owner: str) -> dict[str, float]:
    """`docker run -d -p 127.0.0.1:<port>:8080 <image>` through the Engine API, until the port answers."""
    port = free_port()
    env = {
        "AUBE_INSTANCE_ID": "bare",
        "AUBE_FUNCTION": "cold",
        "AUBE_VERSION": "1",
        "AUBE_INSTANCE_PORT": "8080",
    }
    t0 = time.perf_counter()
    container = client.containers.run(
        image,
        detach=True,
        environment=env,
        ports={"8080/tcp": ("127.0.0.1", port)},
        labels={names.LABEL_OWNER: owner, "aube.bench": "bare"},
    )
    try:
        up = wait_until(lambda: http_status("127.0.0.1", port, names.INSTANCE_HEALTH_PATH) == 200, 60, "docker run")
        first_echo(f"127.0.0.1:{port}")
        echo = time.perf_counter() - t0
    finally:
        container.remove(force=True)
    return {"port_s": up, "echo_s": echo}


def bare_python_start() -> float:
    """`python -c pass`: the interpreter's own floor, which no fresh process can go under."""
    t0 = time.perf_counter()
    subprocess.run([PY, "-c", "pass"], check=True)
    return time.perf_counter() - t0


def scenario_cold_process(s: Settings, stacks: list[Stack], work: Path) -> list[dict[str, Any]]:
    """Process cold start with each stack's settings (with and without a zygote), interleaved with the two floors:
    the bare instance server until its port answers, and a bare `python -c pass`."""
    log(f"cold start on {', '.join(st.label for st in stacks)}")
    for stack in stacks:
        anyio.run(upload, stack, "cold", manifest(0, 4))
    aube: dict[str, list[dict[str, float]]] = {st.label: [] for st in stacks}
    bare: list[dict[str, float]] = []
    python: list[float] = []
    for rep in range(s.cold_reps):
        for config in rotate([*aube, "bare", "python"], rep):
            if config == "bare":
                bare.append(bare_process_start(work))
            elif config == "python":
                python.append(bare_python_start())
            else:
                stack = next(st for st in stacks if st.label == config)
                aube[config].append(anyio.run(aube_cold_start, stack, "cold"))
    floor_s, python_s = median([r["port_s"] for r in bare]), median(python)
    results = []
    for label, samples in aube.items():
        aube_s = median([r["total_s"] for r in samples])
        results.append(
            {
                "runtime": label,
                "aube_s": aube_s,
                "ratio": aube_s / floor_s,
                "aube_scale_reply_s": median([r["scale_reply_s"] for r in samples]),
                "floor_port_s": floor_s,
                "floor_echo_s": median([r["echo_s"] for r in bare]),
                "python_s": python_s,
                "ratio_python": aube_s / python_s,
                "aube_samples_s": [r["total_s"] for r in samples],
                "floor_samples_s": [r["port_s"] for r in bare],
                "python_samples_s": python,
            }
        )
        log(f"  {results[-1]}")
    return results


def cold_process(s: Settings, work: Path, owner: str, stop: ExitStack) -> list[dict[str, Any]]:
    """Process cold start in bubblewrap (the default wherever it works; the zygote exists for sandboxed instances
    only), with the zygote and without, each on a platform and owner of its own."""
    stacks = [
        Stack(work, "process", f"{owner}z", stop, "process sandboxed (zygote)", AUBE_SANDBOX="bwrap"),
        Stack(
            work, "process", f"{owner}f", stop, "process sandboxed (no zygote)", AUBE_SANDBOX="bwrap", AUBE_ZYGOTE="off"
        ),
    ]
    for stack in stacks:
        anyio.run(stack.wait_ready)
    return scenario_cold_process(s, stacks, work)


def scenario_cold(s: Settings, stack: Stack, work: Path, docker_client: Any = None) -> dict[str, Any]:
    runtime = stack.runtime
    log(f"cold start on {runtime}")
    anyio.run(upload, stack, "cold", manifest(0, 4))
    image = ""
    if runtime == "docker":

        async def version() -> int:
            async with stack.client() as (_, registry):
                fn = await registry.get_function("cold")
                assert fn is not None
                return int(fn.record.version)

        image = names.image_tag(stack.owner, "cold", anyio.run(version))
    aube: list[dict[str, float]] = []
    bare: list[dict[str, float]] = []
    for rep in range(s.cold_reps):
        for config in rotate(["aube", "bare"], rep):
            if config == "aube":
                aube.append(anyio.run(aube_cold_start, stack, "cold"))
            elif runtime == "process":
                bare.append(bare_process_start(work))
            else:
                bare.append(bare_docker_start(docker_client, image, stack.owner))
    aube_s = median([r["total_s"] for r in aube])
    floor_s = median([r["port_s"] for r in bare])
    result: dict[str, Any] = {
        "runtime": runtime,
        "aube_s": aube_s,
        "ratio": aube_s / floor_s,
        "aube_scale_reply_s": median([r["scale_reply_s"] for r in aube]),
        "floor_port_s": floor_s,
        "floor_echo_s": median([r["echo_s"] for r in bare]),
        "aube_samples_s": [r["total_s"] for r in aube],
        "floor_samples_s": [r["port_s"] for r in bare],
    }
    log(f"  {result}")
    return result


def scenario_burst(s: Settings, stack: Stack) -> dict[str, Any]:
    log(f"burst: {s.burst_clients} clients at once, min_free = 2")
    runs = []
    for rep in range(s.burst_reps):
        name = f"burst{rep}"
        anyio.run(upload, stack, name, manifest(2, max(s.burst_clients, 2)))
        anyio.run(free_addresses, stack, name, 2)
        r = loadgen("burst", f"127.0.0.1:{stack.proxy_port}/{name}", "--clients", str(s.burst_clients))
        log(f"  rep {rep}: served {r['served']} rejected {r['rejected']} all in {r['all_served_s']:.2f} s")
        runs.append(r)
        anyio.run(delete, stack, name)
    return {
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
# Report


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
    }


def fmt(v: Any, digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return f"{v:,.{digits}f}" if isinstance(v, float | int) else str(v)


def targets_of(results: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    out: list[tuple[str, str, bool | None]] = []
    dp = results.get("datapath")
    if dp and dp["nginx"]:
        for size in sorted({row["size"] for row in dp["table"]}):
            rows = [r for r in dp["table"] if r["size"] == size]
            for streams in sorted({r["streams"] for r in rows}):
                by = {r["config"]: r for r in rows if r["streams"] == streams}
                a, t = by["aube"], by["nginx-tuned"]
                cpu = a["proxy_cpu_us_per_rt"] / t["proxy_cpu_us_per_rt"] if t["proxy_cpu_us_per_rt"] else None
                thr = a["rt_per_s"] / t["rt_per_s"]
                out.append(
                    (
                        f"proxy CPU/round trip <= 1.0x tuned nginx ({size} B, {streams} streams)",
                        f"{fmt(cpu, 2)}x ({fmt(a['proxy_cpu_us_per_rt'], 1)} vs {fmt(t['proxy_cpu_us_per_rt'], 1)} µs)",
                        None if cpu is None else cpu <= 1.0,
                    )
                )
                out.append(
                    (
                        f"throughput >= tuned nginx ({size} B, {streams} streams)",
                        f"{thr:.2f}x ({a['rt_per_s']:,.0f} vs {t['rt_per_s']:,.0f} rt/s)",
                        thr >= 1.0,
                    )
                )
    su = results.get("setup")
    if su:
        out.append(
            ("stream setup p50 adds <= 1 ms over direct", f"+{su['added_p50_ms']:.2f} ms", su["added_p50_ms"] <= 1.0)
        )
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
    b = results.get("burst")
    if b:
        ok = all(x == b["clients"] for x in b["served"]) and not any(b["rejected"])
        out.append(
            (f"burst of {b['clients']} serves all, rejects none", f"served {b['served']}, rejected {b['rejected']}", ok)
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
        lines += [
            "",
            "## 2. Stream setup (warm pool)",
            "",
            "Connect, upgrade, first 64 B echo; sequential, one client. `direct` rotates over free instances.",
            "",
            "| path | p50 ms | p99 ms |",
            "| --- | --- | --- |",
        ]
        for c, v in su["setup"].items():
            lines.append(f"| {c} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} |")
        lines += [
            "",
            f"Stream setups per second through one proxy replica ({su['setups_parallel']} clients looping connect, "
            f"echo, close): **{su['setups_per_s']:.0f}/s**, proxy CPU {su['proxy_cpu_us_per_setup']:.0f} µs per "
            f"setup (errors: {su['setups_errors']}).",
        ]
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
    b = results.get("burst")
    if b:
        lines += [
            "",
            "## 4. Burst",
            "",
            f"{b['clients']} clients connect at once through one proxy to a function with `min_free = 2` "
            f"(process runtime, `max_instances = {b['clients']}`, default claim timeout). Each holds its stream "
            "until all are served.",
            "",
            "| last client served, median s (all only where served = clients) | first served s | served per rep "
            "| rejected per rep |",
            "| --- | --- | --- | --- |",
            f"| {b['all_served_s']:.2f} | {b['first_served_s']:.3f} | {b['served']} | {b['rejected']} |",
        ]
        if b["errors"]:
            lines += ["", f"Errors: `{b['errors']}`"]
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
    colors = {"direct": "#4c72b0", "aube": "#dd8452", "nginx-stock": "#55a868", "nginx-tuned": "#c44e52"}
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
            proc = Stack(work, "process", owner, stop)
            anyio.run(proc.wait_ready)
            proc.start_proxy()
            dp = scenario_datapath(s, proc, work, stop)
            results["datapath"] = dp
            results["setup"] = scenario_setup(s, proc, dp["addresses"])
            results["profile"] = profile_proxy(s, proc, work)
            # The same runtime without a zygote, on a platform (and owner) of its own, for the comparison.
            results["cold"] = cold_process(s, work, owner, stop)
            results["burst"] = scenario_burst(s, proc)
            results["upload"] = [scenario_upload(s, proc)]
            if docker_client is not None:
                try:
                    dock = Stack(work, "docker", owner, stop)
                    anyio.run(dock.wait_ready)
                    results["upload"].append(scenario_upload(s, dock))
                    results["cold"].append(scenario_cold(s, dock, work, docker_client))
                except Exception as e:  # the process-runtime results still get reported
                    log(f"Docker scenarios failed: {e!r}")
                    results["notes"].append(f"The Docker scenarios failed: `{e!r}`.")
    finally:
        if docker_client is not None:
            harness.remove_labelled(docker_client, owner)
            docker_client.close()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
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
