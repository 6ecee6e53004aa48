"""Where the CLI looks for credentials (cli/credsearch.py) and what `aube login` / `aube start` write (cli/login.py):
temporary folders and environments, no server."""

from __future__ import annotations

import io
import stat
from pathlib import Path

import pytest

from aube.cli import credsearch, login
from aube.shared import credentials
from aube.shared.errors import InvalidRequest

ALICE = credentials.Login(user="alice", password="Apassword1")
BOB = credentials.Login(user="bob", password="Bpassword2")


def found(flag: str | None, environ: dict[str, str], cwd: Path) -> Path | None:
    place = credsearch.locate(credsearch.search(flag, environ, cwd))
    return place.path if place else None


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """A home, a platform folder with .data/credentials.env and a function folder inside it, a named file."""
    home, platform = tmp_path / "home", tmp_path / "platform"
    inside = platform / "functions" / "greet"
    inside.mkdir(parents=True)
    home.mkdir()
    credentials.write_login(platform / ".data" / "credentials.env", ALICE)
    named = tmp_path / "named.env"
    credentials.write_login(named, BOB)
    return {"home": home, "platform": platform, "inside": inside, "named": named, "tmp": tmp_path}


def test_the_search_order_is_flag_environment_user_file_platform_folder(layout: dict[str, Path]) -> None:
    home, platform, named = layout["home"], layout["platform"], layout["named"]
    user_file = home / ".config" / "aube" / "credentials.env"
    credentials.write_login(user_file, BOB)
    other = layout["tmp"] / "other.env"
    credentials.write_login(other, ALICE)
    env = {"HOME": str(home), "AUBE_CREDENTIALS": str(other)}
    assert found(str(named), env, platform) == named  # --credentials first
    assert found(None, env, platform) == other  # then $AUBE_CREDENTIALS
    assert found(None, {"HOME": str(home)}, platform) == user_file  # then the user's own file
    user_file.unlink()
    assert found(None, {"HOME": str(home)}, platform) == platform / ".data" / "credentials.env"  # then the platform's


def test_the_platform_folder_is_found_from_a_folder_inside_it_and_nowhere_else(layout: dict[str, Path]) -> None:
    env = {"HOME": str(layout["home"])}
    assert found(None, env, layout["inside"]) == layout["platform"] / ".data" / "credentials.env"
    outside = layout["tmp"] / "elsewhere"
    outside.mkdir()
    assert found(None, env, outside) is None


def test_a_relative_named_file_is_relative_to_the_current_folder(layout: dict[str, Path]) -> None:
    env = {"HOME": str(layout["home"])}
    assert found("named.env", env, layout["tmp"]) == layout["named"]
    assert found(None, {**env, "AUBE_CREDENTIALS": "named.env"}, layout["tmp"]) == layout["named"]


def test_a_named_file_that_is_missing_is_an_error_naming_it_not_a_fall_back(layout: dict[str, Path]) -> None:
    env = {"HOME": str(layout["home"])}
    missing = layout["tmp"] / "typo.env"
    named_twice = [
        (str(missing), env, "--credentials"),
        (None, {**env, "AUBE_CREDENTIALS": str(missing)}, "AUBE_CREDENTIALS"),
    ]
    for flag, environ, origin in named_twice:
        place = credsearch.locate(credsearch.search(flag, environ, layout["platform"]))
        assert place is not None and place.path == missing  # not the platform folder's file
        with pytest.raises(credsearch.CredentialsMissing) as e:
            credsearch.load(place)
        assert str(missing) in e.value.message and origin in e.value.message


def test_the_user_file_follows_xdg_config_home(tmp_path: Path) -> None:
    assert credsearch.user_credentials_file({"HOME": "/home/u"}) == Path("/home/u/.config/aube/credentials.env")
    xdg = {"HOME": "/home/u", "XDG_CONFIG_HOME": "/cfg"}
    assert credsearch.user_credentials_file(xdg) == Path("/cfg/aube/credentials.env")
    # The XDG rules: a relative XDG_CONFIG_HOME is ignored, as an empty one is.
    for ignored in ("relative/cfg", ""):
        environ = {"HOME": "/home/u", "XDG_CONFIG_HOME": ignored}
        assert credsearch.user_credentials_file(environ) == Path("/home/u/.config/aube/credentials.env")


def test_the_places_looked_are_all_named(layout: dict[str, Path]) -> None:
    outside = layout["tmp"] / "elsewhere"
    outside.mkdir()
    where = credsearch.search(None, {"HOME": str(layout["home"])}, outside)
    said = where.describe()
    assert str(layout["home"] / ".config" / "aube" / "credentials.env") in said
    assert str(outside / ".data" / "credentials.env") in said and "each folder above it" in said


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_login_copies_a_file_to_the_user_file_private(layout: dict[str, Path]) -> None:
    env = {"HOME": str(layout["home"])}
    source = layout["tmp"] / "with-servers.env"
    credentials.write_login(source, ALICE, nats_url="nats://10.0.0.1:4222,nats://10.0.0.2:4222")
    path, _ = login.login(str(source), env, layout["tmp"])
    assert path == layout["home"] / ".config" / "aube" / "credentials.env"
    assert credentials.load_login(path) == ALICE
    assert credentials.servers_of(path) == "nats://10.0.0.1:4222,nats://10.0.0.2:4222"
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    # A later login replaces it (the user asked), and a folder made loose by hand is tightened again.
    path.parent.chmod(0o755)
    login.login(str(layout["named"]), env, layout["tmp"])
    assert credentials.load_login(path) == BOB and mode(path.parent) == 0o700


def test_login_without_a_file_takes_the_platform_folders(layout: dict[str, Path]) -> None:
    env = {"HOME": str(layout["home"])}
    path, source = login.login(None, env, layout["inside"])
    assert source == str(layout["platform"] / ".data" / "credentials.env")
    assert credentials.load_login(path) == ALICE


def test_login_reads_a_file_from_stdin_and_refuses_one_without_a_password(
    layout: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"HOME": str(layout["home"])}
    monkeypatch.setattr("sys.stdin", io.StringIO("AUBE_NATS_USER=alice\nAUBE_NATS_DEPLOYER_PASSWORD=Apassword1\n"))
    path, _ = login.login("-", env, layout["tmp"])
    assert credentials.load_login(path) == ALICE
    empty = layout["tmp"] / "empty.env"
    empty.write_text("AUBE_NATS_USER=alice\n")
    with pytest.raises(InvalidRequest):
        login.login(str(empty), env, layout["tmp"])
    assert credentials.load_login(path) == ALICE  # a refused login leaves the user's file as it was


def test_start_keeps_new_credentials_for_the_user_but_never_overwrites_theirs(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg"), "HOME": str(tmp_path)}
    kept = login.remember_default_login(ALICE, env, "nats://127.0.0.1:4333")
    assert kept == tmp_path / "cfg" / "aube" / "credentials.env"
    assert credentials.load_login(kept) == ALICE and credentials.servers_of(kept) == "nats://127.0.0.1:4333"
    assert mode(kept) == 0o600 and mode(kept.parent) == 0o700
    assert login.remember_default_login(BOB, env) is None
    assert credentials.load_login(kept) == ALICE
