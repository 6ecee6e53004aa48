"""Import `aube.*` from a checkout that is not installed: the rig's containers bind-mount it read-only at /opt/aube.

Copied into the host image's virtualenv with a .pth file that calls `install`, so every Python there finds the
checkout's packages by the `[tool.setuptools.package-dir]` table of its pyproject.toml, read when Python starts:
a code change, or a new service added to that table, needs no image rebuild. Standard library only.
The rig also asks it whether a checkout has a module (`has_module`), to skip a service not written yet.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

TOP = "aube"


def package_folders(root: Path) -> dict[str, Path]:
    """The checkout's packages by installed name (`aube.proxy` -> <root>/services/proxy); empty without one."""
    try:
        table = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError):
        return {}
    return {str(name): root / str(folder) for name, folder in table.items()}


def module_file(root: Path, module: str) -> Path | None:
    """The file that defines `module` in the checkout at `root`, or None: the deepest package of the table that
    contains it, then ordinary modules and subpackages below that package's folder."""
    packages = package_folders(root)
    parts = module.split(".")
    for depth in range(len(parts), 0, -1):
        folder = packages.get(".".join(parts[:depth]))
        if folder is None:
            continue
        below = folder.joinpath(*parts[depth:])
        for candidate in (below / "__init__.py", below.with_suffix(".py") if parts[depth:] else None):
            if candidate is not None and candidate.is_file():
                return candidate
        return None
    return None


def has_module(root: Path, module: str) -> bool:
    return module_file(root, module) is not None


class CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds the table's packages (and the `aube` namespace above them); modules inside a package are found by
    the ordinary path finder through the package's __path__."""

    def __init__(self, packages: dict[str, Path]) -> None:
        self.packages = packages

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == TOP:
            spec = importlib.machinery.ModuleSpec(TOP, None, is_package=True)
            spec.submodule_search_locations = []
            return spec
        folder = self.packages.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


def install(root: str) -> None:
    """Called by the .pth file at every start of the virtualenv's Python; does nothing without a checkout."""
    packages = package_folders(Path(root))
    if packages:
        sys.meta_path.insert(0, CheckoutFinder(packages))
