from __future__ import annotations

import json
import stat
from pathlib import Path

import bcrypt
import pytest

from aube.shared import agentlogins, credentials, tenants
from aube.shared.errors import AubeError, InvalidRequest

REPO = Path(__file__).resolve().parents[2]


def test_platform_secrets_are_created_once_private_and_kept(tmp_path: Path) -> None:
    first = credentials.platform_secrets(tmp_path)
    assert credentials.platform_secrets(tmp_path) == first
    path = tmp_path / credentials.PLATFORM_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(set(first.passwords.values())) == 4  # one per service and the fetch user (agents: per host)
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


def test_each_host_agent_gets_a_user_of_its_own_scoped_to_its_host(tmp_path: Path) -> None:
    login, path = credentials.add_host(tmp_path, "h1")
    assert login.user == "aube-agent-h1" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert credentials.ensure_host(tmp_path, "h1") == (login, path)  # kept as it is
    with pytest.raises(AubeError, match="exists already"):
        credentials.add_host(tmp_path, "h1")
    with pytest.raises(AubeError, match="no host"):
        credentials.rotate_host(tmp_path, "h2")
    rotated, _ = credentials.rotate_host(tmp_path, "h1")
    assert rotated.password != login.password
    credentials.add_host(tmp_path, "h2")
    template = (REPO / "deploy" / "nats.conf").read_text()
    assert template.count(agentlogins.MARKER) == 1
    rendered = agentlogins.render_config(template, credentials.host_hashes(tmp_path))
    assert agentlogins.MARKER not in rendered
    h1 = rendered[rendered.index('user: "aube-agent-h1"') : rendered.index('user: "aube-agent-h2"')]
    assert '"aube.host.h1.start"' in h1 and '"$KV.aube-hosts.h1"' in h1 and '"aube.host.h1.exited"' in h1
    assert '"_AUBE_AGENT.h1.>"' in h1
    assert not any(other in h1 for other in ("aube.host.h2", "aube-hosts.h2", "_AUBE_AGENT.h2"))
    assert "_INBOX" not in h1 and "aube.host.*" not in h1 and "$KV.aube-hosts.>" not in h1
    assert rotated.password not in rendered  # hashes only


@pytest.mark.parametrize(
    ("hosts", "why"),
    [
        ({"H1": "$2b$10$" + "a" * 53}, "host id"),
        ({"h1 ] }": "$2b$10$" + "a" * 53}, "host id"),
        ({"h1": 'x" } ] include "/etc/passwd'}, "bcrypt"),
    ],
)
def test_a_host_list_cannot_inject_configuration(hosts: dict[str, str], why: str) -> None:
    with pytest.raises(AubeError, match=why):
        agentlogins.render_users(hosts)


def test_a_configuration_without_its_marker_is_refused() -> None:
    with pytest.raises(AubeError, match="host-agents"):
        agentlogins.render_config("accounts {}\n", {})
