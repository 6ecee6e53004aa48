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
from aube.shared import tenants as tenancy
from aube.shared.errors import InvalidRequest
from aube.shared.natsserver import find_nats_server, signal_reload, write_run_config


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


def write_tenant_config(nats_conf: Path, data_dir: Path) -> Path:
    """deploy/nats.conf and its tenant includes, rendered into <data>/nats/conf from the tenant list."""
    hashes = tenancy.TenantFile(data_dir / credentials.TENANT_LIST_FILE).load()
    return write_run_config(nats_conf, data_dir / "nats" / "conf", hashes)


def is_nats_server(pid: int) -> bool:
    """Whether process `pid` runs the nats-server executable (" (deleted)" after an upgrade replaced the file)."""
    try:
        executable = Path(os.readlink(f"/proc/{pid}/exe")).name
    except OSError:
        return False
    return executable.removesuffix(" (deleted)") == "nats-server"


def add_tenant(name: str, *, nats_conf: Path, workdir: Path) -> tuple[Path, bool]:
    """`aube tenant add NAME`: the tenant's credentials file, and whether a running nats-server was reloaded."""
    data_dir = workdir / ".data"
    # Every tenant's storage quota must fit the server's max_file_store, or nats-server starts no JetStream at all
    # (the default tenant, made by the first `aube start`, counts too).
    known = tenancy.TenantFile(data_dir / credentials.TENANT_LIST_FILE).load()
    fits = tenancy.tenants_that_fit(nats_conf.read_text())
    if fits is not None and len({*known, tenancy.DEFAULT_TENANT, name}) > fits:
        raise InvalidRequest(
            f"{nats_conf} reserves room for {fits} tenants of {tenancy.DEFAULT_JETSTREAM_QUOTA} each "
            "(jetstream max_file_store): raise max_file_store there to add more"
        )
    _, path = credentials.add_tenant(data_dir, name)
    return path, _reload(nats_conf, data_dir)


def rotate_tenant(name: str, *, nats_conf: Path, workdir: Path) -> tuple[Path, bool]:
    """`aube tenant rotate NAME`: a new password (the old one, leaked say, stops working at the reload)."""
    data_dir = workdir / ".data"
    _, path = credentials.rotate_tenant(data_dir, name)
    return path, _reload(nats_conf, data_dir)


def _reload(nats_conf: Path, data_dir: Path) -> bool:
    """Render the tenant configuration again and make a running nats-server reload it; whether one was."""
    write_tenant_config(nats_conf, data_dir)
    pid_file = data_dir / "nats" / "nats-server.pid"
    try:
        pid = int(pid_file.read_text().strip())
        # A stale pid file (a crashed server) may name another process by now: signal only a nats-server, known by
        # its executable (a `tail -f nats-server.log` mentions the name too, and SIGHUP would end it).
        if not is_nats_server(pid):
            return False
        signal_reload(pid)
    except (OSError, ValueError):
        return False
    return True


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

    # The platform's NATS passwords and the default tenant: created on the first start, kept in the data folder
    # (mode 0600). Each service gets its own login only; nats-server gets them all from its environment.
    data_dir = workdir / ".data"
    creds_path = workdir / credentials.DEFAULT_CREDENTIALS_FILE
    secrets = credentials.platform_secrets(data_dir)
    credentials.ensure_default_tenant(data_dir, creds_path)
    run_config = write_tenant_config(nats_conf, data_dir)

    def login_env(service: str) -> dict[str, str]:
        login = secrets.service_login(service)
        return {"AUBE_NATS_USER": login.user, "AUBE_NATS_PASSWORD": login.password}

    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    status = 0
    try:
        spawn("nats-server", [find_nats_server(), "-c", str(run_config)], secrets.environment())
        _wait_nats(env.get("AUBE_NATS_MONITOR", "http://127.0.0.1:8222"), procs[0][1])
        controlplane_env = {
            **login_env("controlplane"),
            "AUBE_NATS_FETCH_PASSWORD": secrets.fetch_password,
            "AUBE_STOP_INSTANCES_ON_EXIT": "true",
        }
        spawn("controlplane", [py, "-m", "aube.controlplane"], controlplane_env)
        spawn("reaper", [py, "-m", "aube.reaper"], login_env("reaper"))
        for i in range(proxies):
            proxy_id = {"AUBE_PROXY_ID": f"proxy-{i + 1}-{os.getpid()}"}
            spawn(f"proxy-{i + 1}", [py, "-m", "aube.proxy"], {**login_env("proxy"), **proxy_id})
        print(f"[aube] platform up: ws://localhost:{env.get('AUBE_PROXY_PORT', '8093')}/<name>  (Ctrl-C stops)")
        print(
            f"[aube] deploy with scripts/upload.sh or .venv/bin/aube; the nats CLI needs --user "
            f"{credentials.DEPLOYER_USER} --password from {creds_path}; more tenants: aube tenant add NAME",
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
