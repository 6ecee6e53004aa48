"""Installed as `aube.shared`; the guard below keeps it importable under that one name."""

if __name__ != "aube.shared":  # pragma: no cover - only reached by a wrong import
    raise ImportError(f"{__name__!r} is installed as 'aube.shared'; import it under that name")
