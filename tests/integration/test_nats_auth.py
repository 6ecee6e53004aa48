"""deploy/nats.conf's authorization: no anonymous clients, deployers only deploy, services do the rest.

Runs the real configuration file (on free ports) with a real control plane and the real aube CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import nats
import pytest

from aube.shared import credentials, names
from aube.shared.natsserver import LocalNatsServer, find_nats_server
from aube.shared.registry import Registry

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("runtime_kind", ["process"], indirect=True)
async def test_only_authenticated_deployers_deploy_and_only_services_touch_the_registry(
    platform_on, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    creds = credentials.load_or_create(tmp_path / "credentials.env")
    with LocalNatsServer(config=REPO / "deploy" / "nats.conf", env=creds.environment()) as server:
        service_url = credentials.with_user(server.url, credentials.SERVICE_USER, creds.service_password)
        deployer_url = credentials.with_user(server.url, credentials.DEPLOYER_USER, creds.deployer_password)
        platform = platform_on(service_url)
        try:
            await platform.start_controlplane()

            def cli(*argv: str, creds_file: Path) -> subprocess.CompletedProcess[str]:
                env = {**os.environ, "AUBE_NATS_URL": server.url, credentials.ENV_CREDENTIALS_FILE: str(creds_file)}
                return subprocess.run(
                    [sys.executable, "-m", "aube.cli", *argv], env=env, capture_output=True, text=True, timeout=300
                )

            # No anonymous clients, no wrong passwords (in a subprocess: nats-py leaks a socket on refusal).
            wrong = tmp_path / "wrong.env"
            wrong.write_text(f"{credentials.ENV_SERVICE_PASSWORD}=nope\n{credentials.ENV_DEPLOYER_PASSWORD}=nope\n")
            for creds_file in (tmp_path / "missing.env", wrong):
                refused = cli("ls", creds_file=creds_file)
                assert refused.returncode == 1
                assert "Authorization Violation" in refused.stderr

            # A bundle above the 8 MB max payload travels through the object store, which deployers may use.
            big = tmp_path / "big"
            big.mkdir()
            (big / "fn.py").write_text((REPO / "examples" / "reverse-async" / "fn.py").read_text())
            (big / "payload.bin").write_bytes(os.urandom(9 * 1024 * 1024))
            deployed = cli("deploy", str(big), "big", creds_file=tmp_path / "credentials.env")
            assert deployed.returncode == 0, deployed.stderr
            assert deployed.stdout.strip().endswith("/big")

            violations: list[str] = []

            async def on_error(e: Exception) -> None:
                violations.append(str(e))

            deployer = await nats.connect(deployer_url, error_cb=on_error)
            services = await nats.connect(service_url)
            try:
                registry = await Registry.open(services.jetstream())
                (entry,) = await registry.instances("big")
                # The registry and the internal subjects are the services' alone.
                await deployer.publish(f"$KV.{names.BUCKET_INSTANCES}.big.0", b"{}")
                stop = {"name": "big", "slot": entry.record.slot, "instance_id": entry.record.instance_id}
                await deployer.publish(names.SUBJECT_STOP_INSTANCE, json.dumps(stop).encode())
                await deployer.publish(names.SUBJECT_SCALE, b'{"name": "big", "count": 3}')
                await deployer.flush()
                with anyio.fail_after(5):
                    while len(violations) < 3:
                        await anyio.sleep(0.05)
                assert all("permissions violation" in v for v in violations)
                await anyio.sleep(1)
                assert [e.record.instance_id for e in await registry.instances("big")] == [entry.record.instance_id]
                listed = await deployer.request(names.SUBJECT_LIST, b"{}", timeout=10)
                assert [f["name"] for f in json.loads(listed.data)["functions"]] == ["big"]
            finally:
                await deployer.close()
                await services.close()
        finally:
            platform.stop_all()  # before the server goes; the fixture checks for leftovers


def test_deploy_nats_conf_accepts_every_generated_password(tmp_path: Path) -> None:
    """`nats-server -t` checks the real config with the passwords in its environment, as `aube start` passes them.
    Before passwords were letters and digits, about 1 in 32 starts failed with "variable reference ... could not be
    parsed"."""
    for i in range(40):
        creds = credentials.load_or_create(tmp_path / f"credentials-{i}.env")
        checked = subprocess.run(
            [find_nats_server(), "-c", str(REPO / "deploy" / "nats.conf"), "-t"],
            env={**os.environ, **creds.environment()},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert checked.returncode == 0, checked.stderr + checked.stdout
