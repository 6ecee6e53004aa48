"""Installed as `aube.controlplane`; the guard below keeps it importable under that one name."""

if __name__ != "aube.controlplane":  # pragma: no cover - only reached by a wrong import
    raise ImportError(f"{__name__!r} is installed as 'aube.controlplane'; import it under that name")
