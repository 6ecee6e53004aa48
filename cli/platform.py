"""`aube start`: the whole platform in the foreground — nats-server, control plane, reaper, proxy replicas.

Each service is its own process, as in production; they meet only over NATS. Ctrl-C (or SIGTERM) stops them in
order: proxies first (they release their claims), then the reaper, the control plane (which stops its instances),
and NATS last. If a service dies on its own, the platform stops with its exit status rather than limp along.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from aube.shared import credentials
from aube.shared.natsserver import find_nats_server
from aube.shared.settings import DEFAULT_NATS_URL, DEFAULT_OPERATOR_PORT


def _wait_nats(monitor: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"nats-server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{monitor}/healthz?js-enabled-only=true", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("nats-server did not become healthy")


def _operator_ports(setting: str | None, proxies: int) -> list[int] | None:
    """Each replica's operator port (metrics): AUBE_OPERATOR_PORT (default 9093) plus the replica's index, since
    each replica's metrics are its own; None when the setting turns the endpoint off."""
    if setting is not None and setting.strip().lower() in ("", "none", "off"):
        return None
    try:
        base = int(setting) if setting is not None else DEFAULT_OPERATOR_PORT
    except ValueError as e:
        raise SystemExit(f"AUBE_OPERATOR_PORT must be a port number or off, got {setting!r}") from e
    return [base + i for i in range(proxies)]


def start_platform(*, proxies: int, nats_conf: Path, workdir: Path, env: dict[str, str]) -> int:
    py = sys.executable
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(label: str, argv: list[str], extra: dict[str, str] | None = None) -> None:
        # Its own session: Ctrl-C in a terminal signals the whole foreground group, and nats-server would quit at
        # once, before the control plane could stop its instances. Only this supervisor takes the signal and
        # stops the services in order.
        proc = subprocess.Popen(argv, cwd=workdir, env={**env, **(extra or {})}, start_new_session=True)
        procs.append((label, proc))
        print(f"[aube] started {label} (pid {proc.pid})", flush=True)

    # The platform's NATS passwords: created on the first start, kept in the data folder (mode 0600).
    creds_path = workdir / credentials.DEFAULT_CREDENTIALS_FILE
    creds = credentials.load_or_create(creds_path)
    nats_url = env.get("AUBE_NATS_URL", DEFAULT_NATS_URL)
    service_env = {"AUBE_NATS_URL": credentials.with_user(nats_url, credentials.SERVICE_USER, creds.service_password)}
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    status = 0
    try:
        spawn("nats-server", [find_nats_server(), "-c", str(nats_conf)], creds.environment())
        _wait_nats(env.get("AUBE_NATS_MONITOR", "http://127.0.0.1:8222"), procs[0][1])
        spawn("controlplane", [py, "-m", "aube.controlplane"], {**service_env, "AUBE_STOP_INSTANCES_ON_EXIT": "true"})
        spawn("reaper", [py, "-m", "aube.reaper"], service_env)
        operator_ports = _operator_ports(env.get("AUBE_OPERATOR_PORT"), proxies)
        operator_host = env.get("AUBE_OPERATOR_HOST", "127.0.0.1")
        for i in range(proxies):
            extra = {"AUBE_PROXY_ID": f"proxy-{i + 1}-{os.getpid()}"}
            if operator_ports is not None:
                extra["AUBE_OPERATOR_PORT"] = str(operator_ports[i])
            spawn(f"proxy-{i + 1}", [py, "-m", "aube.proxy"], {**service_env, **extra})
            if operator_ports is not None:
                print(f"[aube] proxy-{i + 1} metrics: http://{operator_host}:{operator_ports[i]}/_aube/metrics")
        print(f"[aube] platform up: ws://localhost:{env.get('AUBE_PROXY_PORT', '8093')}/<name>  (Ctrl-C stops)")
        print(
            f"[aube] deploy with scripts/upload.sh or .venv/bin/aube; the nats CLI needs --user "
            f"{credentials.DEPLOYER_USER} --password from {creds_path}",
            flush=True,
        )
        while not stopping:
            for label, proc in procs:
                if proc.poll() is not None:
                    print(f"[aube] {label} exited with status {proc.returncode}: stopping the platform", flush=True)
                    status = proc.returncode or 1
                    stopping = True
                    break
            time.sleep(0.2)
    finally:
        # Reverse start order: proxies, reaper, control plane, NATS.
        for label, proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(90 if label == "controlplane" else 15)
                except subprocess.TimeoutExpired:
                    print(f"[aube] {label} did not stop in time: killing it", flush=True)
                    proc.kill()
                    proc.wait()
        print("[aube] stopped", flush=True)
    return status
