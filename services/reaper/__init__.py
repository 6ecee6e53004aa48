"""Installed as `aube.reaper`; the guard below keeps it importable under that one name."""

if __name__ != "aube.reaper":  # pragma: no cover - only reached by a wrong import
    raise ImportError(f"{__name__!r} is installed as 'aube.reaper'; import it under that name")
