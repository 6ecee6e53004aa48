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
