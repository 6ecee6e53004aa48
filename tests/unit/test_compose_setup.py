"""The compose setup step (aube.cli.compose_setup): secrets made on the first start and kept after, each service's
login file holding its own password only, the rendered NATS configuration."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aube.cli import compose_setup
from aube.shared import credentials

NATS_CONF = Path(__file__).resolve().parents[2] / "deploy" / "nats.conf"


def _env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


def test_first_start_creates_and_later_starts_keep(tmp_path: Path) -> None:
    creds = compose_setup.prepare(tmp_path, NATS_CONF, "nats://127.0.0.1:14222")
    first = (creds.read_text(), (tmp_path / credentials.PLATFORM_FILE).read_text())
    assert _env(creds)[credentials.ENV_NATS_URL] == "nats://127.0.0.1:14222"
    assert credentials.ENV_DEPLOYER_PASSWORD in _env(creds)
    assert (tmp_path / "nats" / "conf" / "nats.conf").is_file()
    for path in (creds, tmp_path / credentials.PLATFORM_FILE):
        assert path.stat().st_mode & 0o077 == 0

    compose_setup.prepare(tmp_path, NATS_CONF, "nats://127.0.0.1:14222")
    assert (creds.read_text(), (tmp_path / credentials.PLATFORM_FILE).read_text()) == first

    other = tmp_path.parent / "other"
    compose_setup.prepare(other, NATS_CONF, "nats://127.0.0.1:14222")
    assert (other / credentials.PLATFORM_FILE).read_text() != first[1]  # fresh passwords, none shipped


def test_each_service_mounts_its_own_login_only(tmp_path: Path) -> None:
    compose_setup.prepare(tmp_path, NATS_CONF, "nats://127.0.0.1:14222")
    secrets = credentials.platform_secrets(tmp_path)
    all_passwords = set(secrets.environment().values())
    for service in credentials.SERVICE_USERS:
        path = tmp_path / compose_setup.LOGINS_DIR / service / compose_setup.LOGIN_FILE
        env = _env(path)
        assert env[credentials.ENV_USER] == secrets.service_login(service).user
        assert env[credentials.ENV_PASSWORD] == secrets.service_login(service).password
        others = all_passwords - {env[credentials.ENV_PASSWORD], env.get(credentials.ENV_FETCH_PASSWORD)}
        assert not others & set(env.values())
        assert path.stat().st_mode & 0o077 == 0
    controlplane = _env(tmp_path / compose_setup.LOGINS_DIR / "controlplane" / compose_setup.LOGIN_FILE)
    assert controlplane[credentials.ENV_FETCH_PASSWORD] == secrets.fetch_password
    proxy = _env(tmp_path / compose_setup.LOGINS_DIR / "proxy" / compose_setup.LOGIN_FILE)
    assert credentials.ENV_FETCH_PASSWORD not in proxy


def test_unprivileged_services_own_their_login_only(tmp_path: Path) -> None:
    """Run as root here (CI): the proxy's and the reaper's login files become the service user's, mode 0600; the
    control plane's stays root's, which the service user cannot read."""
    if os.geteuid() != 0:
        pytest.skip("giving files away needs root")
    compose_setup.prepare(tmp_path, NATS_CONF, "nats://127.0.0.1:14222", service_user=(65534, 65534))
    for service in credentials.SERVICE_USERS:
        path = tmp_path / compose_setup.LOGINS_DIR / service / compose_setup.LOGIN_FILE
        expected = 65534 if service in ("proxy", "reaper") else 0
        assert (path.stat().st_uid, path.parent.stat().st_uid) == (expected, expected), service
        assert path.stat().st_mode & 0o077 == 0


def test_service_user_parsing_and_owners() -> None:
    assert compose_setup.parse_user("65534:65534") == (65534, 65534)
    for bad in ("nobody", "1000", "a:b", ":1"):
        with pytest.raises(ValueError, match="UID:GID"):
            compose_setup.parse_user(bad)
    assert compose_setup.login_owner("proxy", (7, 8)) == (7, 8)
    assert compose_setup.login_owner("reaper", (7, 8)) == (7, 8)
    assert compose_setup.login_owner("controlplane", (7, 8)) is None
