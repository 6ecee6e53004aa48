"""`aube start`: the whole platform in the foreground — nats-server, control plane, reaper, proxy replicas.

Each service is its own process, as in production; they meet only over NATS. Ctrl-C (or SIGTERM) stops them in
order: proxies first (they release their claims), then the reaper, the control plane (which stops its instances),
and NATS last. A service that dies on its own is restarted with backoff while the others keep running
(`supervisor.py`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from aube.cli.login import remember_default_login
from aube.cli.supervisor import Service, Supervisor
from aube.shared import credentials
from aube.shared import tenants as tenancy
from aube.shared.errors import InvalidRequest, RuntimeFailure
from aube.shared.natsserver import find_nats_server, write_run_config
from aube.shared.reloadcheck import client_url, reload_until_reachable
from aube.shared.settings import (
    DEFAULT_CONTROLPLANE_OPERATOR_PORT,
    DEFAULT_NATS_URL,
    DEFAULT_OPERATOR_PORT,
    DEFAULT_REAPER_OPERATOR_PORT,
)


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
    """deploy/nats.conf and its tenant includes, rendered into <data>/nats/conf from the tenant and host lists."""
    hashes = tenancy.TenantFile(data_dir / credentials.TENANT_LIST_FILE).load()
    return write_run_config(nats_conf, data_dir / "nats" / "conf", hashes, credentials.host_hashes(data_dir))


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


def add_host(host_id: str, *, nats_conf: Path, workdir: Path) -> tuple[Path, bool]:
    """`aube host add ID`: the agent's login file, and whether a running nats-server was reloaded."""
    data_dir = workdir / ".data"
    _, path = credentials.add_host(data_dir, host_id)
    return path, _reload(nats_conf, data_dir)


def rotate_host(host_id: str, *, nats_conf: Path, workdir: Path) -> tuple[Path, bool]:
    """`aube host rotate ID`: a new password for a host's agent (the old one stops working at the reload)."""
    data_dir = workdir / ".data"
    _, path = credentials.rotate_host(data_dir, host_id)
    return path, _reload(nats_conf, data_dir)


def _reload(nats_conf: Path, data_dir: Path) -> bool:
    """Render the tenant configuration again and make a running nats-server reload it, until every tenant's
    imports reach the platform (aube.shared.reloadcheck: one SIGHUP leaves a new account's imports dead); whether
    a server was running. The server is probed where it listens for clients (else at $AUBE_NATS_URL's first
    address, else the default)."""
    write_tenant_config(nats_conf, data_dir)
    pid_file = data_dir / "nats" / "nats-server.pid"
    try:
        pid = int(pid_file.read_text().strip())
        # A stale pid file (a crashed server) may name another process by now: signal only a nats-server, known by
        # its executable (a `tail -f nats-server.log` mentions the name too, and SIGHUP would end it).
        if not is_nats_server(pid):
            return False
    except (OSError, ValueError):
        return False
    tenants = tenancy.TenantFile(data_dir / credentials.TENANT_LIST_FILE).load()
    url = client_url(pid) or os.environ.get("AUBE_NATS_URL", DEFAULT_NATS_URL).split(",")[0].strip()
    broken = reload_until_reachable(pid, url, credentials.platform_secrets(data_dir), tenants)
    if broken:
        raise RuntimeFailure(
            f"nats-server reloaded its configuration, but requests of {', '.join(broken)} still reach no service at "
            f"{url}: restart nats-server (the services reconnect)"
        )
    return True


def _operator_port(env: dict[str, str], variable: str, default: int) -> int | None:
    """The operator (metrics) port `variable` sets, `default` when unset; None when it turns the endpoint off."""
    setting = env.get(variable)
    if setting is not None and setting.strip().lower() in ("", "none", "off"):
        return None
    try:
        return int(setting) if setting is not None else default
    except ValueError as e:
        raise SystemExit(f"{variable} must be a port number or off, got {setting!r}") from e


def metrics_endpoints(env: dict[str, str], proxies: int) -> dict[str, int]:
    """Each service's operator (metrics) port, by its label in `aube start`'s output; a service whose endpoint is
    off is left out. Two services given one port would leave the second unable to start: refused up front."""
    ports: dict[str, int | None] = {
        "controlplane": _operator_port(env, "AUBE_CONTROLPLANE_OPERATOR_PORT", DEFAULT_CONTROLPLANE_OPERATOR_PORT),
        "reaper": _operator_port(env, "AUBE_REAPER_OPERATOR_PORT", DEFAULT_REAPER_OPERATOR_PORT),
    }
    # Each replica's metrics are its own: replica i gets AUBE_OPERATOR_PORT (default 9093) + i (0: a free port each).
    base = _operator_port(env, "AUBE_OPERATOR_PORT", DEFAULT_OPERATOR_PORT)
    ports.update((f"proxy-{i + 1}", None if base is None else base and base + i) for i in range(proxies))
    chosen = {label: port for label, port in ports.items() if port is not None}
    by_port: dict[int, list[str]] = {}
    for label, port in chosen.items():
        if port != 0:  # 0: each gets a free port of its own
            by_port.setdefault(port, []).append(label)
    clashes = [f"{' and '.join(labels)} on {port}" for port, labels in by_port.items() if len(labels) > 1]
    if clashes:
        raise SystemExit(
            f"operator (metrics) ports collide: {'; '.join(clashes)} (AUBE_OPERATOR_PORT, "
            "AUBE_CONTROLPLANE_OPERATOR_PORT, AUBE_REAPER_OPERATOR_PORT)"
        )
    return chosen


def start_platform(*, proxies: int, nats_conf: Path, workdir: Path, env: dict[str, str]) -> int:
    py = sys.executable
    supervisor = Supervisor(workdir, env, lambda line: print(f"[aube] {line}", flush=True))

    # The platform's NATS passwords and the default tenant: created on the first start, kept in the data folder
    # (mode 0600). Each service gets its own login only; nats-server gets them all from its environment.
    data_dir = workdir / ".data"
    creds_path = workdir / credentials.DEFAULT_CREDENTIALS_FILE
    secrets = credentials.platform_secrets(data_dir)
    earlier = credentials.load_login(creds_path)
    deployer = credentials.ensure_default_tenant(data_dir, creds_path)
    # New credentials are also kept where the CLI finds them from any folder, unless the user has a file there.
    kept = remember_default_login(deployer, env, env.get("AUBE_NATS_URL", "")) if deployer != earlier else None
    run_config = write_tenant_config(nats_conf, data_dir)

    def login_env(service: str, **extra: str) -> Callable[[int], dict[str, str]]:
        login = secrets.service_login(service)
        return lambda _generation: {"AUBE_NATS_USER": login.user, "AUBE_NATS_PASSWORD": login.password, **extra}

    def proxy_env(replica: int, operator_port: int | None) -> Callable[[int], dict[str, str]]:
        login = secrets.service_login("proxy")
        # Each replica's metrics are its own: its own operator port ("off" when the setting turns them off).
        operator = {"AUBE_OPERATOR_PORT": "off" if operator_port is None else str(operator_port)}

        # A restarted replica is a new proxy: its predecessor's claims are those of a dead proxy, recycled when that
        # lease expires, not adopted by a process that knows nothing of their streams.
        def env_for(generation: int) -> dict[str, str]:
            proxy_id = f"proxy-{replica}-{os.getpid()}" + (f"-r{generation}" if generation else "")
            return {
                "AUBE_NATS_USER": login.user,
                "AUBE_NATS_PASSWORD": login.password,
                "AUBE_PROXY_ID": proxy_id,
                **operator,
            }

        return env_for

    monitor = env.get("AUBE_NATS_MONITOR", "http://127.0.0.1:8222")
    endpoints = metrics_endpoints(env, proxies)  # a port clash stops the start before anything runs
    supervisor.install_signal_handlers()
    try:
        supervisor.start(
            Service(
                "nats-server",
                [find_nats_server(), "-c", str(run_config)],
                lambda _generation: secrets.environment(),
                ready=lambda proc: _wait_nats(monitor, proc),
            )
        )
        fetch = {"AUBE_NATS_FETCH_PASSWORD": secrets.fetch_password, "AUBE_STOP_INSTANCES_ON_EXIT": "true"}
        supervisor.start(
            Service("controlplane", [py, "-m", "aube.controlplane"], login_env("controlplane", **fetch), 90.0)
        )
        supervisor.start(Service("reaper", [py, "-m", "aube.reaper"], login_env("reaper")))
        for i in range(proxies):
            port = endpoints.get(f"proxy-{i + 1}")
            supervisor.start(Service(f"proxy-{i + 1}", [py, "-m", "aube.proxy"], proxy_env(i + 1, port)))
        operator_host = env.get("AUBE_OPERATOR_HOST", "127.0.0.1")
        for label, port in endpoints.items():
            if port:  # 0: a free port, which the service's log names
                print(f"[aube] {label} metrics: http://{operator_host}:{port}/_aube/metrics")
                if label.startswith("proxy-"):
                    print(f"[aube] {label} dashboard: http://{operator_host}:{port}/_aube/dashboard")
        print(f"[aube] platform up: ws://localhost:{env.get('AUBE_PROXY_PORT', '8093')}/<name>  (Ctrl-C stops)")
        print(
            f"[aube] deploy with scripts/upload.sh or .venv/bin/aube; the nats CLI needs --user "
            f"{credentials.DEPLOYER_USER} --password from {creds_path}; more tenants: aube tenant add NAME",
            flush=True,
        )
        if kept is not None:
            print(f"[aube] {credentials.DEPLOYER_USER}'s credentials are also in {kept}: aube finds them anywhere")
        supervisor.run()
    finally:
        supervisor.stop_all()
        print("[aube] stopped", flush=True)
    return 0
