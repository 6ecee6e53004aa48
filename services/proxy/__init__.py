"""Installed as `aube.proxy`; the guard below keeps it importable under that one name."""

if __name__ != "aube.proxy":  # pragma: no cover - only reached by a wrong import
    raise ImportError(f"{__name__!r} is installed as 'aube.proxy'; import it under that name")
