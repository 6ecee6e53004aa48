"""Installed as `aube.cli`; the guard below keeps it importable under that one name."""

if __name__ != "aube.cli":  # pragma: no cover - only reached by a wrong import
    raise ImportError(f"{__name__!r} is installed as 'aube.cli'; import it under that name")
