"""The sandbox's host-side file helpers on a temporary folder (no sandbox is started here)."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from aube.controlplane.runtimes import sandbox, stage
from aube.shared.errors import RuntimeFailure


def test_share_read_only_makes_everything_readable_and_nothing_writable_by_others(tmp_path: Path) -> None:
    root = tmp_path / "v1"
    (root / "fn" / "pkg").mkdir(parents=True)
    (root / "fn" / "fn.py").write_text("x")
    (root / "fn" / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "fn" / "fn.py", 0o600)
    os.chmod(root / "fn" / "run.sh", 0o777)
    os.chmod(root / "fn" / "pkg", 0o700)
    outside = tmp_path / "outside.txt"
    outside.write_text("host file")
    os.chmod(outside, 0o600)
    (root / "fn" / "link").symlink_to(outside)
    stage.share_read_only(root)
    assert stat.S_IMODE((root / "fn" / "fn.py").stat().st_mode) == 0o644
    assert stat.S_IMODE((root / "fn" / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "fn" / "pkg").stat().st_mode) == 0o755
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600  # a link is never followed
    if os.geteuid() == 0:
        assert (root / "fn" / "fn.py").stat().st_uid == 0


def test_lock_run_dir_refuses_anything_but_a_socket(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / sandbox.SOCKET_NAME).symlink_to("/run/docker.sock")
    with pytest.raises(RuntimeFailure, match="something else than its socket"):
        stage.lock_run_dir(run_dir, privileged=os.geteuid() == 0)


def test_lock_run_dir_accepts_the_socket(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(run_dir / sandbox.SOCKET_NAME))
        stage.lock_run_dir(run_dir, privileged=os.geteuid() == 0)
    assert stat.S_IMODE(run_dir.stat().st_mode) in (0o700, 0o500)
