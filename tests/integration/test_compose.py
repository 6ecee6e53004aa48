"""deploy/compose.yaml: the platform as containers on one host, brought up and down with Docker Compose.

From what scripts/setup.sh leaves in the engine (the base and runtime images, and aube-platform:local), the real
`docker-compose` (v1; `docker compose` where only v2 is installed) brings the platform up under a project name and
ports of the test's own, the real aube CLI deploys a function with the credentials the compose setup created, a real
WebSocket client round-trips a message through the published proxy port, and `down -v` leaves nothing behind.
Its data folder lies inside the checkout, under .data, as the default one does: the proxy and the reaper, each
searched from its container's root, hold no password but their own, and run as a user that is not root.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from harness import remove_labelled
from support import consecutive_free_ports
from websockets.sync.client import connect

from aube.shared import credentials, names

pytestmark = [pytest.mark.docker, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "deploy" / "compose.yaml"
IMAGE = "aube-platform:local"
COMPOSE_PROJECT_LABEL = "com.docker.compose.project"


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode == 0:
        return ["docker", "compose"]
    if os.environ.get("AUBE_REQUIRE_DOCKER") == "1":
        pytest.fail("AUBE_REQUIRE_DOCKER=1 but neither docker-compose nor docker compose is installed (setup.sh)")
    pytest.skip("no docker-compose")


def ensure_image(client: Any) -> None:
    """scripts/setup.sh tags the image; a machine set up with AUBE_SKIP_IMAGES=1 gets it the same way here."""
    import docker.errors

    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        env = {**os.environ, "PYTHONPATH": str(REPO / "scripts")}
        subprocess.run([sys.executable, "-m", "rig", "compose-image"], cwd=REPO, env=env, check=True, timeout=1200)


def wait_healthy(client: Any, project: str, timeout: float = 120) -> None:
    """What `docker compose up -d --wait` does (v1 has no --wait): every long-running service reports healthy."""
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        found = client.containers.list(all=True, filters={"label": f"{COMPOSE_PROJECT_LABEL}={project}"})
        states = {
            c.labels.get("com.docker.compose.service", c.name): c.attrs["State"].get("Health", {}).get("Status", "")
            for c in found
        }
        states.pop("setup", None)  # runs once and exits
        if len(states) == 4 and set(states.values()) == {"healthy"}:
            return
        time.sleep(1)
    raise AssertionError(f"services not healthy after {timeout:g}s: {states}")


def leftovers(client: Any, project: str, owner: str) -> dict[str, list[str]]:
    by_project = {"label": f"{COMPOSE_PROJECT_LABEL}={project}"}
    by_owner = {"label": f"{names.LABEL_OWNER}={owner}"}
    return {
        "containers": [c.name for c in client.containers.list(all=True, filters=by_project)],
        "volumes": [v.name for v in client.volumes.list(filters=by_project)],
        "networks": [n.name for n in client.networks.list(filters=by_project)],
        "instances": [c.name for c in client.containers.list(all=True, filters=by_owner)],
    }


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def service_container(client: Any, project: str, service: str) -> Any:
    filters = {"label": [f"{COMPOSE_PROJECT_LABEL}={project}", f"com.docker.compose.service={service}"]}
    (found,) = client.containers.list(filters=filters)
    return found


def files_holding(container: Any, secrets: list[str]) -> list[str]:
    """Every file in the container's filesystem (not /proc or /sys) holding one of `secrets`, searched as root in
    the container: whatever its service's user may read, root there reads too."""
    script = 'cd / && exec grep -rlsF -D skip "$@" $(ls -A / | grep -vx -e proc -e sys)'
    patterns = [arg for secret in secrets for arg in ("-e", secret)]
    code, out = container.exec_run(["sh", "-c", script, "sh", *patterns], user="0")
    assert code in (0, 1, 2), out  # 2: some file was unreadable even to root (a socket); matches still listed
    return out.decode().split()


def assert_sees_only_own_login(client: Any, project: str, service: str, data: Path) -> None:
    platform = read_env(data / credentials.PLATFORM_FILE)
    own = platform[credentials.SERVICE_USERS[service][1]]
    tenant = read_env(data / "credentials.env")[credentials.ENV_DEPLOYER_PASSWORD]
    foreign = [value for value in platform.values() if value != own] + [tenant]
    container = service_container(client, project, service)
    assert files_holding(container, foreign) == [], f"{service} can read another's password"
    assert files_holding(container, [own]) == ["run/aube-login/login.env"]  # the search does find what is there
    code, uid = container.exec_run(["id", "-u"])
    assert code == 0 and uid.decode().strip() != "0", f"{service} runs as root"
    code, login = container.exec_run(["cat", "/run/aube-login/login.env"])  # as the service's own user
    assert code == 0, login
    assert f"={own}\n" in login.decode()


def test_compose_up_deploy_stream_down(docker_client: Any, test_owner: str, tmp_path: Path) -> None:
    compose = compose_command()
    ensure_image(docker_client)
    project = f"aubetest{uuid.uuid4().hex[:8]}"
    base = consecutive_free_ports(6)
    nats_port, monitor_port, proxy_port = base, base + 1, base + 2
    cp_operator, reaper_operator, proxy_operator = base + 3, base + 4, base + 5
    # Inside the checkout like the default (../.data/compose): no service may see it through its source mounts.
    data = REPO / ".data" / f"compose-{project}"
    data.mkdir(parents=True)  # else the engine creates it, owned by root: a setup as the test's user cannot write
    user = f"{os.getuid()}:{os.getgid()}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AUBE_")},
        "AUBE_COMPOSE_DATA": str(data),
        "AUBE_COMPOSE_NATS_PORT": str(nats_port),
        "AUBE_COMPOSE_NATS_MONITOR_PORT": str(monitor_port),
        "AUBE_COMPOSE_PROXY_PORT": str(proxy_port),
        "AUBE_COMPOSE_CONTROLPLANE_OPERATOR_PORT": str(cp_operator),
        "AUBE_COMPOSE_REAPER_OPERATOR_PORT": str(reaper_operator),
        "AUBE_COMPOSE_PROXY_OPERATOR_PORT": str(proxy_operator),
        "AUBE_COMPOSE_OWNER": test_owner,
        "AUBE_COMPOSE_USER": user,
        # Only root gives files away: run as another user, setup can make the services' logins its own user's only.
        **({} if os.getuid() == 0 else {"AUBE_COMPOSE_SERVICE_USER": user}),
    }
    argv = [*compose, "-f", str(COMPOSE_FILE), "-p", project]

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*argv, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False, cwd=tmp_path
        )

    try:
        up = run("up", "-d")
        assert up.returncode == 0, f"compose up failed:\n{up.stdout}\n{up.stderr}\n{run('logs').stdout[-4000:]}"
        try:
            wait_healthy(docker_client, project)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{run('logs').stdout[-4000:]}") from None

        # The compose setup created the platform's passwords and the default tenant's login on this first start.
        creds = data / "credentials.env"
        assert "AUBE_NATS_DEPLOYER_PASSWORD=" in creds.read_text()
        assert f"AUBE_NATS_URL=nats://127.0.0.1:{nats_port}" in creds.read_text()
        assert (data / "platform.env").stat().st_mode & 0o077 == 0

        cli_env = {**env, "AUBE_CREDENTIALS": str(creds), "HOME": str(tmp_path)}
        aube = Path(sys.executable).parent / "aube"
        deploy = subprocess.run(
            [str(aube), "deploy", "--json", str(REPO / "examples" / "reverse"), "rev"],
            env=cli_env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert deploy.returncode == 0, f"{deploy.stdout}\n{deploy.stderr}\n{run('logs').stdout[-4000:]}"
        reply = json.loads(deploy.stdout.strip().splitlines()[-1])
        assert reply["ok"] is True
        assert reply["url"] == f"ws://localhost:{proxy_port}/rev"

        with connect(f"ws://127.0.0.1:{proxy_port}/rev", open_timeout=60, proxy=None) as ws:
            ws.send("hello compose")
            assert ws.recv(timeout=30) == "esopmoc olleh"

        # The internet-facing proxy, and the reaper, hold their own login only; an instance mounts nothing but its
        # own handoff folder (runtimes/handoffdir.py: where a proxy of this host may hand it clients' sockets).
        for service in ("proxy", "reaper"):
            assert_sees_only_own_login(docker_client, project, service, data)
        instances = docker_client.containers.list(filters={"label": f"{names.LABEL_OWNER}={test_owner}"})
        assert instances
        for c in instances:
            mounts = [(m["Source"], m["Destination"]) for m in c.attrs["Mounts"]]
            instance_id = c.labels[names.LABEL_INSTANCE]
            assert mounts == [(f"/run/aube-docker/{test_owner}/{instance_id}", "/aube/run")], mounts

        # Its requirements.txt was installed by pip in bubblewrap, which the control plane's container lets start.
        controlplane_log = run("logs", "controlplane").stdout
        assert "with the docker runtime" in controlplane_log
        assert "bubblewrap does not start here" not in controlplane_log

        # The instance is a container on the host's engine, of this platform's owner; operator ports on loopback.
        assert leftovers(docker_client, project, test_owner)["instances"]
        with urllib.request.urlopen(f"http://127.0.0.1:{cp_operator}/_aube/metrics", timeout=10) as r:
            assert r.status == 200

        # The operator adds a tenant the way the README says: `aube tenant add` in the setup container, then a
        # restart of nats-server (services reconnect). Alice logs in and sees none of the default tenant's functions.
        added = run(
            "run", "--rm", "setup", "python", "-m", "aube.cli.main", "tenant", "add", "alice",
            "--nats-conf", "/opt/aube/deploy/nats.conf",
        )  # fmt: skip
        assert added.returncode == 0, f"{added.stdout}\n{added.stderr}"
        assert run("restart", "nats").returncode == 0
        alice_env = {
            **cli_env,
            "AUBE_CREDENTIALS": str(data / "tenants" / "alice.env"),
            "AUBE_NATS_URL": f"nats://127.0.0.1:{nats_port}",
        }
        deadline = time.monotonic() + 60
        while True:
            listed = subprocess.run(
                [str(aube), "ls", "--json"], env=alice_env, capture_output=True, text=True, timeout=60, check=False
            )
            if listed.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)  # the control plane reconnects on its own schedule
        assert listed.returncode == 0, f"{listed.stdout}\n{listed.stderr}"
        assert json.loads(listed.stdout) == []

        down = run("down", "-v", timeout=180)
        assert down.returncode == 0, f"compose down failed:\n{down.stdout}\n{down.stderr}"
        assert leftovers(docker_client, project, test_owner) == {
            "containers": [], "volumes": [], "networks": [], "instances": [],
        }  # fmt: skip
    finally:
        with contextlib.suppress(Exception):
            run("down", "-v", timeout=180)
        # Function images outlive `down` by design (docs): a test removes its own.
        remove_labelled(docker_client, test_owner)
        shutil.rmtree(data, ignore_errors=True)
