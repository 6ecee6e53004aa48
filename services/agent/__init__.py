"""Installed as `aube.agent`; the guard below keeps it importable under that one name."""

if __name__ != "aube.agent":  # pragma: no cover - only reached by a wrong import
    raise ImportError(f"{__name__!r} is installed as 'aube.agent'; import it under that name")
