"""shared/redact.py: what reaches a deployer carries no credential and no host path, and is bounded."""

from __future__ import annotations

import sys
from pathlib import Path

from aube.shared.redact import HIDDEN, Redactor, clip, platform_redactor, url_passwords

SECRET = "Qx7hT2mKp9ZrW4sVb8NcY3dLf6GjA1eR"


def test_url_userinfo_is_hidden_whatever_the_scheme() -> None:
    r = Redactor()
    assert r.for_log("nats://aube:s3cret@127.0.0.1:4222") == f"nats://{HIDDEN}@127.0.0.1:4222"
    assert r.for_log("Looking in indexes: https://user:p@ss@idx.example/simple") == (
        f"Looking in indexes: https://{HIDDEN}@idx.example/simple"
    )
    assert r.for_log("git+https://ghp_token123@github.example/x.git") == f"git+https://{HIDDEN}@github.example/x.git"
    assert r.for_log("see https://pypi.org/simple/x/ and a@b") == "see https://pypi.org/simple/x/ and a@b"


def test_key_value_and_bearer_secrets_are_hidden() -> None:
    r = Redactor()
    text = (
        "AUBE_NATS_SERVICE_PASSWORD=abc123\npassword: hunter2 token='xyz' api_key=\"k k\" secret=s;"
        " Authorization: Bearer eyJhbGciOiJIUzI1NiJ9"
    )
    out = r.for_log(text)
    for leaked in ("abc123", "hunter2", "xyz", "k k", "secret=s", "eyJhbGciOiJIUzI1NiJ9"):
        assert leaked not in out, out
    assert "AUBE_NATS_SERVICE_PASSWORD=***" in out and "Bearer ***" in out
    # Words that only look related stay.
    assert r.for_log("tokens_sha256 entries are 64 hex digits") == "tokens_sha256 entries are 64 hex digits"


def test_known_secrets_are_hidden_anywhere_also_percent_encoded() -> None:
    r = Redactor(secrets=[SECRET, "p@ss/word", "ab"])
    assert SECRET not in r.for_log(f"no such package {SECRET}x")
    assert r.for_log("/data/p%40ss%2Fword/x") == f"/data/{HIDDEN}/x"
    assert r.for_log("tab") == "tab"  # too short to be treated as a secret


def test_host_paths_become_placeholders_longest_first() -> None:
    r = Redactor(paths={"/work/repo": "<aube>", "/work/repo/.data": "<data>", "/work/repo/.venv/": "<venv>"})
    out = r.for_deployer(
        "Looking in links: /work/repo/.data/wheels\n"
        "python /work/repo/.venv/bin/python\n"
        "reading /work/repo/.data/credentials.env and /work/repo/fn.py\n"
        "cannot write /sys/fs/cgroup/memory/process_api/abc/aube/x: Permission denied\n"
        "home /root/.cache, not /rooted or /usr/lib\n"
        "context /tmp/aube-build-x1y2/Dockerfile, not /tmp/other"
    )
    assert out.splitlines() == [
        "Looking in links: <data>/wheels",
        "python <venv>/bin/python",
        "reading <data>/credentials.env and <aube>/fn.py",
        "cannot write <cgroup>: Permission denied",
        "home <home>/.cache, not /rooted or /usr/lib",
        "context <tmp>/Dockerfile, not /tmp/other",
    ]
    assert r.for_log("/work/repo/.data/x") == "/work/repo/.data/x"  # the operator's log keeps paths


def test_terminal_control_characters_are_dropped() -> None:
    assert Redactor().for_deployer("\x1b[31mred\x1b[0m\x07 bell\x1b]0;title\x07\tand tab") == "red bell0;title\tand tab"


def test_clip_keeps_the_first_and_last_lines_and_bounds_bytes() -> None:
    text = "\n".join(f"line {i}" for i in range(100))
    lines = clip(text, max_bytes=10_000, max_lines=5).splitlines()
    assert lines == ["line 0", "[... 96 lines not shown ...]", "line 97", "line 98", "line 99"]
    cut = clip("é" * 1000, max_bytes=101, max_lines=5)
    assert len(cut.encode()) <= 101 and cut.endswith("[... cut]")
    assert clip("one line", max_bytes=100, max_lines=1) == "one line"
    assert clip("a\nb\nc", max_bytes=100, max_lines=1) == "a"
    assert len(Redactor().for_deployer("x" * 100_000).encode()) <= 4096


def test_url_passwords_of_a_server_list() -> None:
    assert url_passwords("nats://aube:one@h1:4222, nats://aube:t%40o@h2:4222,nats://h3") == [
        "one",
        "one",
        "t%40o",
        "t@o",
    ]
    assert url_passwords("nats://127.0.0.1:4222") == []


def test_platform_redactor_knows_the_data_dir_sources_and_virtualenv(tmp_path: Path) -> None:
    r = platform_redactor(secrets=[SECRET], data_dir=str(tmp_path / "data"))
    sources = str(Path(__file__).resolve().parents[2])
    out = r.for_deployer(f"{tmp_path}/data/functions/x {sys.prefix}/bin/python {sources}/shared/x.py {SECRET}")
    assert out == f"{tmp_path}/data/functions/x <venv>/bin/python <aube>/shared/x.py ***".replace(
        f"{tmp_path}/data", "<data>"
    )
