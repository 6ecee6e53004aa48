from __future__ import annotations

import json
import stat
from pathlib import Path

import bcrypt
import pytest

from aube.shared import credentials, tenants
from aube.shared.errors import InvalidRequest


def test_platform_secrets_are_created_once_private_and_kept(tmp_path: Path) -> None:
    first = credentials.platform_secrets(tmp_path)
    assert credentials.platform_secrets(tmp_path) == first
    path = tmp_path / credentials.PLATFORM_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(set(first.passwords.values())) == 5  # one per service (and the host agents) and the fetch user
    assert first.service_login("proxy").user == "aube-proxy"


def test_generated_passwords_are_letters_and_digits_starting_with_a_letter() -> None:
    passwords = {credentials.new_password() for _ in range(2000)}
    assert len(passwords) == 2000
    assert all(credentials.SAFE_PASSWORD.fullmatch(p) and len(p) == credentials.PASSWORD_LENGTH for p in passwords)


def test_an_unparseable_platform_password_is_replaced(tmp_path: Path) -> None:
    (tmp_path / credentials.PLATFORM_FILE).write_text("AUBE_NATS_PROXY_PASSWORD=-VDuTz\n")
    secrets = credentials.platform_secrets(tmp_path)
    assert all(credentials.SAFE_PASSWORD.fullmatch(p) for p in secrets.passwords.values())
    assert [p.name for p in tmp_path.iterdir()] == [credentials.PLATFORM_FILE]  # no staging file left behind


def test_the_deployers_file_holds_no_platform_secret_and_an_old_one_is_cleaned(tmp_path: Path) -> None:
    creds = tmp_path / "credentials.env"
    # The form of earlier versions: the service password sat beside the deployer's, where deployers read it.
    creds.write_text("AUBE_NATS_SERVICE_PASSWORD=Servicepw1\nAUBE_NATS_DEPLOYER_PASSWORD=Deployerpw1\n")
    login = credentials.ensure_default_tenant(tmp_path, creds)
    assert login == credentials.Login(user="deployer", password="Deployerpw1")
    assert "Servicepw1" not in creds.read_text()
    hashes = json.loads((tmp_path / credentials.TENANT_LIST_FILE).read_text())
    assert bcrypt.checkpw(b"Deployerpw1", hashes["deployer"].encode())
    assert credentials.ensure_default_tenant(tmp_path, creds) == login  # idempotent


def test_adding_a_tenant_writes_its_login_and_refuses_duplicates_and_bad_names(tmp_path: Path) -> None:
    login, path = credentials.add_tenant(tmp_path, "alice")
    assert credentials.load_login(path) == login and login.user == "alice"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(InvalidRequest, match="exists already"):
        credentials.add_tenant(tmp_path, "alice")
    for bad in ("Alice", "aube-x", "aube", "a.b", "a b", "-a", "a-", "x" * 33, "", "a>", "*"):
        with pytest.raises(InvalidRequest, match="invalid tenant name"):
            credentials.add_tenant(tmp_path, bad)


def test_tenant_subjects_name_their_tenant_and_plain_subjects_are_the_operators() -> None:
    assert tenants.tenant_subject("alice", "aube.fn.upload") == "aube.t.alice.fn.upload"
    assert tenants.tenant_of("aube.t.alice.fn.upload") == "alice"
    assert tenants.tenant_of("aube.fn.upload") == tenants.OPERATOR
    assert tenants.may_touch("alice", "alice") and tenants.may_touch(tenants.OPERATOR, "alice")
    assert not tenants.may_touch("bob", "alice") and not tenants.may_touch("bob", tenants.OPERATOR)


def test_rendered_accounts_export_each_tenants_subjects_to_that_tenant_only() -> None:
    hashes = {"alice": "$2b$10$" + "a" * 53, "bob": "$2b$10$" + "b" * 53}  # bcrypt-shaped: anything else is refused
    exports = tenants.render_exports(hashes, ["aube.fn.upload"], "aube.events.fn")
    assert '{service: "aube.t.alice.fn.upload", accounts: [alice]' in exports
    assert '{stream: "aube.t.bob.events.fn.>", accounts: [bob]}' in exports
    accounts = tenants.render_accounts(hashes, ["aube.fn.upload"], "aube.events.fn", "aube-bundles", "1MB")
    assert 'subject: "aube.t.alice.fn.upload"}, to: "aube.fn.upload"' in accounts
    assert "aube.t.bob" not in accounts.split("bob: {")[0]  # alice's account imports nothing of bob's
    with pytest.raises(InvalidRequest, match="malformed"):
        tenants.render_accounts({"eve": 'x"}]}'}, ["aube.fn.upload"], "aube.events.fn", "aube-bundles", "1MB")


def test_a_server_list_is_redacted_url_by_url() -> None:
    # Parsed as one URL, a cluster's list kept the second password, and one with a password first raised.
    assert credentials.redact("nats://a:4222, nats://u:pw2@b:4223") == "nats://a:4222,nats://u:***@b:4223"
    assert credentials.redact("nats://u:pw1@a:4222,nats://u:pw2@b:4223") == "nats://u:***@a:4222,nats://u:***@b:4223"
    assert credentials.redact("nats://a:4222,nats://b:4223") == "nats://a:4222,nats://b:4223"
    assert "pw" not in credentials.redact("nats://u:pw@a:99999")
