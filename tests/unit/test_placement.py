"""Where a new instance goes, and how the host protocol names handles and versions (pure)."""

from __future__ import annotations

from pathlib import Path

from aube.controlplane.placement import choose_host, live
from aube.controlplane.runtimes import hostwire
from aube.shared.schemas import HostLease

NOW = 1000.0


def host(host_id: str, *, capacity: int = 10, renewed_at: float = NOW, runtime: str = "docker") -> HostLease:
    return HostLease(
        host_id=host_id,
        runtime=runtime,
        capacity=capacity,
        started_at=0.0,
        renewed_at=renewed_at,
        ttl=6.0,  # type: ignore[arg-type]
    )


def test_spread_first_then_load_then_name() -> None:
    hosts = [host("a"), host("b"), host("c")]
    placed = [("a", "f"), ("b", "g"), ("b", "g")]
    # f runs on a: b or c; c is less loaded.
    assert choose_host(hosts, placed, function="f", runtime="docker", now=NOW) == "c"
    # g runs twice on b: a (load 1) before c? c has load 0.
    assert choose_host(hosts, placed, function="g", runtime="docker", now=NOW) == "c"
    # All equal: the host id decides, so equal hosts are chosen the same way.
    assert choose_host(hosts, [], function="f", runtime="docker", now=NOW) == "a"


def test_successive_choices_spread_a_function_evenly() -> None:
    hosts = [host("a"), host("b"), host("c")]
    placed: list[tuple[str, str]] = []
    for _ in range(9):
        chosen = choose_host(hosts, placed, function="f", runtime="docker", now=NOW)
        assert chosen is not None
        placed.append((chosen, "f"))
    assert sorted(h for h, _ in placed) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3


def test_dead_full_excluded_or_other_kind_hosts_are_never_chosen() -> None:
    hosts = [
        host("dead", renewed_at=NOW - 7),
        host("full", capacity=1),
        host("proc", runtime="process"),
        host("tried"),
        host("ok"),
    ]
    placed = [("full", "g")]
    got = choose_host(hosts, placed, function="f", runtime="docker", now=NOW, exclude={"tried"})
    assert got == "ok"
    assert choose_host(hosts[:3], placed, function="f", runtime="docker", now=NOW) is None
    assert live(host("x", renewed_at=NOW - 6), NOW) and not live(host("x", renewed_at=NOW - 6.1), NOW)


def test_handles_and_artifact_refs_round_trip() -> None:
    assert hostwire.split_handle(hostwire.host_handle("h1", "abc/def")) == ("h1", "abc/def")
    assert hostwire.split_handle("12345") == ("", "12345")
    assert hostwire.parse_artifact_ref(hostwire.artifact_ref("my-fn", 12)) == ("my-fn", 12)
    for bad in ("aube-fn-x:v1", "hosts:", "hosts:f:vx", "hosts::v1", "hosts:f"):
        assert hostwire.parse_artifact_ref(bad) is None


def test_a_hosts_extraction_keeps_files_inside_and_refuses_anything_else(tmp_path: Path) -> None:
    import io
    import tarfile

    import pytest

    from aube.agent.service import extract_plain
    from aube.shared.errors import RuntimeFailure

    def tar_of(*members: tuple[tarfile.TarInfo, bytes]) -> tarfile.TarFile:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for info, data in members:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        buf.seek(0)
        return tarfile.open(fileobj=buf)

    good = tarfile.TarInfo("./pkg/fn.py")
    run = tarfile.TarInfo("./run.sh")
    run.mode = 0o755
    dest = tmp_path / "ok"
    dest.mkdir()
    extract_plain(tar_of((good, b"x = 1\n"), (run, b"#!/bin/sh\n")), dest)
    assert (dest / "pkg" / "fn.py").read_text() == "x = 1\n"
    assert (dest / "run.sh").stat().st_mode & 0o111
    cases = (
        ("../escape", tarfile.REGTYPE),
        ("../bad0", tarfile.REGTYPE),
        ("/etc/x", tarfile.REGTYPE),
        ("l", tarfile.SYMTYPE),
    )
    for n, (name, kind) in enumerate(cases):
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = "/etc/passwd"
        bad = tmp_path / f"bad{n}"
        bad.mkdir()
        with pytest.raises(RuntimeFailure):
            extract_plain(tar_of((info, b"")), bad)
    assert not (tmp_path / "escape").exists()
