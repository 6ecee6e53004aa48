"""What every benchmark scenario shares: settings, the platform as processes (Stack), the load generator's process,
uploads and the registry's free instances. bench/ is a folder of scripts, not a package: bench/run.py puts it on
sys.path, with tests/ for the platform harness (tests/harness.py)."""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import harness
import loadgen as lg

from aube.shared import names
from aube.shared.bus import request
from aube.shared.errors import AubeError, UnknownFunction
from aube.shared.natsserver import LocalNatsServer, free_port
from aube.shared.registry import Registry
from aube.shared.schemas import DeleteReply, DeleteRequest, UploadReply, UploadRequest

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
LOADGEN = BENCH / "loadgen.py"
ECHO = BENCH / "echo"
PY = sys.executable

# The services' settings in a benchmark run, beyond the harness's own. Direct connections are the baseline:
# instances on loopback TCP, which sandboxed process instances (no network; a Unix socket) are not. The sandbox is
# not what these figures are about (the handoff platform is sandboxed: handoff needs the instance's socket folder).
# The data path keeps 16 instances free (one per stream), over the default bound of a manifest's min_free.
SERVICE_ENV = {
    "AUBE_LOG_LEVEL": "INFO",
    "AUBE_HEALTH_TIMEOUT": "120",
    "AUBE_SANDBOX": "none",
    "AUBE_MIN_FREE_MAX": "64",
}

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
    # Defaults, so that a results.json written before these existed still rebuilds its Settings (--report-from).
    docker_burst_reps: int = 1  # 50 containers per repetition: one is minutes on a shared engine
    kill_streams: int = 10  # handed-off streams open when the proxy is killed
    memory_reps: int = 3

    @classmethod
    def full(cls, docker: bool, nginx: bool) -> Settings:
        return cls(False, 3, 3.0, 0.5, (64, 65536), (1, 16), 100, 4, 3.0, 5, 50, 3, 3, 6.0, docker, nginx, 1, 10, 3)

    @classmethod
    def smoke_run(cls, docker: bool, nginx: bool) -> Settings:
        return cls(True, 1, 0.3, 0.1, (64, 65536), (1, 2), 5, 2, 0.5, 1, 5, 1, 1, 0.0, docker, nginx, 1, 2, 1)


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

    def start_proxy(self, **env: str) -> None:
        port = free_port()
        start = functools.partial(
            self.platform.start_proxy, AUBE_PROXY_PORT=str(port), AUBE_PROXY_ID=f"bench-{port}", **env
        )
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


def rotate(configs: list[str], rep: int) -> list[str]:
    """Interleaving: every repetition runs every configuration, starting one further along each time."""
    k = rep % len(configs)
    return configs[k:] + configs[:k]
