"""Installed as `aube.instance`; the guard below keeps it importable under that one name."""

if __name__ != "aube.instance":  # pragma: no cover - only reached by a wrong import
    raise ImportError(f"{__name__!r} is installed as 'aube.instance'; import it under that name")
