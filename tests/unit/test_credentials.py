from __future__ import annotations

import stat
from pathlib import Path

from aube.shared import credentials


def test_created_once_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / ".data" / "credentials.env"
    first = credentials.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.service_password != first.deployer_password
    assert credentials.load_or_create(path) == first


def test_urls_carry_users_and_logs_do_not_show_passwords() -> None:
    url = credentials.with_user("nats://127.0.0.1:4222", "deployer", "p@ss/word")
    assert url == "nats://deployer:p%40ss%2Fword@127.0.0.1:4222"
    assert credentials.with_user("nats://me:x@host:1", "deployer", "y") == "nats://me:x@host:1"
    assert credentials.redact(url) == "nats://deployer:***@127.0.0.1:4222"
    assert credentials.redact("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


def test_passwords_are_ones_nats_server_reads_from_its_environment() -> None:
    # nats-server parses the variable as a config value: a leading "-" (1 in 64 for token_urlsafe) or a bare
    # number stops it from starting.
    passwords = {credentials.new_password() for _ in range(2000)}
    assert len(passwords) == 2000
    assert all(credentials.SAFE_PASSWORD.fullmatch(p) and len(p) == credentials.PASSWORD_LENGTH for p in passwords)


def test_a_file_with_an_unparseable_password_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "credentials.env"
    path.write_text(f"{credentials.ENV_SERVICE_PASSWORD}=-VDuTz\n{credentials.ENV_DEPLOYER_PASSWORD}=fine\n")
    creds = credentials.load_or_create(path)
    assert credentials.SAFE_PASSWORD.fullmatch(creds.service_password)
    assert creds.deployer_password != "fine"  # both change together
    assert credentials.load(path) == creds and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["credentials.env"]  # no staging file left behind
