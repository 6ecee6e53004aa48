"""The in-instance server's environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from aube.instance.config import ConfigError, InstanceConfig


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = InstanceConfig.from_env({})
    assert config.fn_dir == tmp_path.resolve()
    assert (config.host, config.port) == ("0.0.0.0", 8080)
    assert (config.runtime, config.command, config.mode) == ("python", [], "lines")
    assert config.command_grace == 2.0
    assert config.shutdown_grace == 5.0


def test_everything_set(tmp_path: Path) -> None:
    config = InstanceConfig.from_env(
        {
            "AUBE_FN_DIR": str(tmp_path),
            "AUBE_INSTANCE_HOST": "127.0.0.1",
            "AUBE_INSTANCE_PORT": "9001",
            "AUBE_FN_RUNTIME": "command",
            "AUBE_FN_COMMAND": '["./prog", "--flag"]',
            "AUBE_FN_MODE": "binary",
            "AUBE_INSTANCE_ID": "abc",
            "AUBE_FUNCTION": "echo",
            "AUBE_VERSION": "3",
            "AUBE_COMMAND_GRACE": "0.5",
            "AUBE_SHUTDOWN_GRACE": "1.5",
        }
    )
    assert config.fn_dir == tmp_path
    assert (config.host, config.port) == ("127.0.0.1", 9001)
    assert (config.runtime, config.command, config.mode) == ("command", ["./prog", "--flag"], "binary")
    assert (config.instance_id, config.function, config.version) == ("abc", "echo", "3")
    assert config.command_grace == 0.5
    assert config.shutdown_grace == 1.5


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AUBE_INSTANCE_PORT": "http"}, "AUBE_INSTANCE_PORT"),
        ({"AUBE_INSTANCE_PORT": "70000"}, "out of range"),
        ({"AUBE_FN_RUNTIME": "java"}, "AUBE_FN_RUNTIME"),
        ({"AUBE_FN_MODE": "words"}, "AUBE_FN_MODE"),
        ({"AUBE_FN_COMMAND": "./prog"}, "not JSON"),
        ({"AUBE_FN_COMMAND": '"./prog"'}, "list of strings"),
        ({"AUBE_FN_COMMAND": "[1]"}, "list of strings"),
        ({"AUBE_FN_RUNTIME": "command"}, "non-empty"),
        ({"AUBE_COMMAND_GRACE": "soon"}, "AUBE_COMMAND_GRACE"),
        ({"AUBE_SHUTDOWN_GRACE": "-1"}, "negative"),
        ({"AUBE_SHUTDOWN_GRACE": "nan"}, "negative"),
    ],
)
def test_bad_environment(tmp_path: Path, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        InstanceConfig.from_env({"AUBE_FN_DIR": str(tmp_path), **env})


def test_instance_credential_names_match_the_platforms() -> None:
    # The instance ships without aube.shared, so it spells these again: they must not drift apart.
    from aube.instance import config
    from aube.shared import names

    assert config.SECRET_HEADER == names.HEADER_INSTANCE_SECRET
    assert config.SECRET_SHA256_ENV == names.ENV_INSTANCE_SECRET_SHA256


def test_instance_credential_hash(tmp_path: Path) -> None:
    digest = "ab" * 32
    assert InstanceConfig.from_env({"AUBE_FN_DIR": str(tmp_path)}).secret_sha256 == ""
    config = InstanceConfig.from_env({"AUBE_FN_DIR": str(tmp_path), "AUBE_INSTANCE_SECRET_SHA256": digest.upper()})
    assert config.secret_sha256 == digest
    for bad in ("plain-secret-value", digest[:-1], digest + "0", digest[:-1] + "g"):
        with pytest.raises(ConfigError, match="AUBE_INSTANCE_SECRET_SHA256") as refused:
            InstanceConfig.from_env({"AUBE_FN_DIR": str(tmp_path), "AUBE_INSTANCE_SECRET_SHA256": bad})
        assert bad not in str(refused.value)  # the value is never echoed into a log
