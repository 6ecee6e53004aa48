"""Installed as `aube.controlplane.runtimes`; the guard below keeps it importable under that one name."""

if __name__ != "aube.controlplane.runtimes":  # pragma: no cover - only reached by a wrong import
    raise ImportError(f"{__name__!r} is installed as 'aube.controlplane.runtimes'; import it under that name")
