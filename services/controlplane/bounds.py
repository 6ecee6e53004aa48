"""The operator's ranges for a manifest's limits and scaling values, the one memory-size parser, and the reserved
environment names (pure: no I/O beyond counting the host's cores for a default).

A deployer is not trusted: whatever `aube.toml` asks for must lie inside what the operator allows
(`AUBE_<KEY>_MIN` / `AUBE_<KEY>_MAX`, see `ManifestBounds.from_settings`). Below the operator's ranges sit hard
floors that no setting can lower, because the engines would otherwise misread the value: Docker refuses memory
under 6 MiB, and a `cpus` under 0.01 becomes 0 nano-CPUs, which Docker reads as "no limit at all".
"""

from __future__ import annotations

import math
import os
import re

import msgspec

from aube.shared.schemas import LimitsSection, ScalingSection
from aube.shared.settings import ControlPlaneSettings

MIB = 1024**2
# Floors no operator setting may go below (see the module docstring).
HARD_MIN_MEMORY = 6 * MIB
HARD_MIN_CPUS = 0.01

_MEMORY = re.compile(r"(\d{1,20})\s*(?:([kmgt])(?:i?b|i)?|b)?", re.IGNORECASE)
_UNITS = {None: 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def memory_bytes(text: str) -> int:
    """`"256m"` -> 268435456. Units k, m, g, t are binary multiples, written `m`, `mb`, `mi` or `mib` in any
    case; `b` or no unit is bytes. The one parser for memory sizes: upload, Docker and the process runtime.

    Raises ValueError for anything else, so callers choose their own error.
    """
    match = _MEMORY.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"memory {text[:40]!r} is not a size like '256m', '1g' or a number of bytes")
    unit = match.group(2).lower() if match.group(2) else None
    return int(match.group(1)) * _UNITS[unit]


def message_bytes(limits: LimitsSection) -> int:
    """`[limits] max_message` in bytes (checked at upload; a record that predates the key has the default)."""
    try:
        return memory_bytes(limits.max_message)
    except ValueError:
        return memory_bytes(LimitsSection().max_message)


MESSAGE_MIN = 1024
MESSAGE_MAX = 64 * 1024 * 1024


def nano_cpus(cpus: float) -> int:
    """Docker's NanoCpus for `cpus`, never under the floor: 0 there means no limit at all, so a record written
    before the floor existed (or any rounding) must not reach the engine as 0."""
    return max(round(cpus * 1e9), round(HARD_MIN_CPUS * 1e9))


def _host_cpus() -> float:
    return float(os.cpu_count() or 1)


class ManifestBounds(msgspec.Struct, frozen=True, kw_only=True):
    """Inclusive ranges; a `None` maximum means no maximum. Memory in bytes, durations in seconds.

    `stream_idle_timeout` and `stream_max_duration` use 0 for "never": it counts as infinitely long, so it is
    refused once the operator sets a maximum for them.
    """

    memory_min: int = HARD_MIN_MEMORY
    memory_max: int = 4 * 1024 * MIB
    cpus_min: float = HARD_MIN_CPUS
    cpus_max: float = msgspec.field(default_factory=_host_cpus)
    pids_min: int = 8
    pids_max: int = 4096
    min_free_min: int = 0
    min_free_max: int = 10
    max_instances_min: int = 1
    max_instances_max: int = 100
    idle_timeout_min: float = 1.0
    idle_timeout_max: float = 86400.0
    stream_idle_timeout_min: float = 0.0
    stream_idle_timeout_max: float | None = None
    stream_max_duration_min: float = 0.0
    stream_max_duration_max: float | None = None

    @classmethod
    def from_settings(cls, settings: ControlPlaneSettings) -> ManifestBounds:
        """The control plane's `AUBE_*_MIN` / `AUBE_*_MAX` settings; ValueError names a setting that is unusable."""
        try:
            memory_min, memory_max = memory_bytes(settings.memory_min), memory_bytes(settings.memory_max)
        except ValueError as e:
            raise ValueError(f"AUBE_MEMORY_MIN / AUBE_MEMORY_MAX: {e}") from e
        bounds = cls(
            memory_min=memory_min,
            memory_max=memory_max,
            cpus_min=settings.cpus_min,
            cpus_max=settings.cpus_max if settings.cpus_max is not None else _host_cpus(),
            pids_min=settings.pids_min,
            pids_max=settings.pids_max,
            min_free_min=settings.min_free_min,
            min_free_max=settings.min_free_max,
            max_instances_min=settings.max_instances_min,
            max_instances_max=settings.max_instances_max,
            idle_timeout_min=settings.idle_timeout_min,
            idle_timeout_max=settings.idle_timeout_max,
            stream_idle_timeout_min=settings.stream_idle_timeout_min,
            stream_idle_timeout_max=settings.stream_idle_timeout_max,
            stream_max_duration_min=settings.stream_max_duration_min,
            stream_max_duration_max=settings.stream_max_duration_max,
        )
        problem = bounds.problem()
        if problem is not None:
            raise ValueError(problem)
        return bounds

    def problem(self) -> str | None:
        """What is wrong with these ranges as settings, or None."""
        floors: dict[str, float] = {
            "memory": HARD_MIN_MEMORY,
            "cpus": HARD_MIN_CPUS,
            "pids": 1,
            "min_free": 0,
            "max_instances": 1,
            "idle_timeout": 0.001,
            "stream_idle_timeout": 0,
            "stream_max_duration": 0,
        }
        for key, floor in floors.items():
            low: float = getattr(self, f"{key}_min")
            high: float | None = getattr(self, f"{key}_max")
            setting = f"AUBE_{key.upper()}_MIN"
            if not math.isfinite(low) or low < floor:
                return f"{setting} must be at least {_fmt(key, floor)}, got {_fmt(key, low)}"
            if high is not None and (not math.isfinite(high) or high < low):
                return f"AUBE_{key.upper()}_MAX must be at least {setting} ({_fmt(key, low)}), got {_fmt(key, high)}"
        return None


def _fmt(key: str, value: float) -> str:
    if key == "memory":
        value = int(value)
        for unit, size in (("g", 1024 * MIB), ("m", MIB)):
            if value % size == 0:
                return f"{value // size}{unit}"
        return str(value)
    return f"{value:g}"


def _range(key: str, low: float, high: float | None) -> str:
    return f"{_fmt(key, low)}..{_fmt(key, high) if high is not None else 'unbounded'}"


def check_bounds(scaling: ScalingSection, limits: LimitsSection, bounds: ManifestBounds) -> str | None:
    """The first value outside its range (the message names the key and the range), or None."""
    try:
        memory = memory_bytes(limits.memory)
    except ValueError as e:
        return f"limits.{e}"
    values: list[tuple[str, str, float, str]] = [
        ("limits", "memory", memory, repr(limits.memory)),
        ("limits", "cpus", limits.cpus, f"{limits.cpus:g}"),
        ("limits", "pids", limits.pids, str(limits.pids)),
        ("scaling", "max_instances", scaling.max_instances, str(scaling.max_instances)),
        ("scaling", "min_free", scaling.min_free, str(scaling.min_free)),
        ("scaling", "idle_timeout", scaling.idle_timeout, f"{scaling.idle_timeout:g}"),
        ("limits", "stream_idle_timeout", limits.stream_idle_timeout, f"{limits.stream_idle_timeout:g}"),
        ("limits", "stream_max_duration", limits.stream_max_duration, f"{limits.stream_max_duration:g}"),
    ]
    for section, key, value, shown in values:
        low: float = getattr(bounds, f"{key}_min")
        high: float | None = getattr(bounds, f"{key}_max")
        name = f"{section}.{key}"
        if math.isnan(value) or math.isinf(value):
            return f"{name} must be a finite number, got {shown}"
        allowed = f"the allowed range {_range(key, low, high)} (set by the operator)"
        if key.startswith("stream_") and value == 0:
            if high is not None:  # 0 means "never": longer than any maximum
                return f"{name} 0 (never) is outside {allowed}"
            continue
        if value < low or (high is not None and value > high):
            return f"{name} {shown} is outside {allowed}"
    if scaling.min_free > scaling.max_instances:
        return (
            f"scaling.min_free must be between 0 and scaling.max_instances ({scaling.max_instances}),"
            f" got {scaling.min_free}"
        )
    return None


def defaults_within(bounds: ManifestBounds) -> dict[str, dict[str, object]]:
    """The schema's defaults for the bounded keys, moved into the operator's ranges: a manifest that leaves a key
    out (an AubeFaaS folder has no manifest at all) gets the nearest allowed value, never a refusal."""
    limits, scaling = LimitsSection(), ScalingSection()

    def clamp(key: str, value: float) -> float:
        low: float = getattr(bounds, f"{key}_min")
        high: float | None = getattr(bounds, f"{key}_max")
        if key.startswith("stream_") and value == 0:  # "never": the longest allowed when there is a maximum
            return high if high is not None else 0.0
        return max(low, value) if high is None else min(max(low, value), high)

    memory = memory_bytes(limits.memory)
    return {
        "limits": {
            "memory": limits.memory if clamp("memory", memory) == memory else str(int(clamp("memory", memory))),
            "cpus": clamp("cpus", limits.cpus),
            "pids": int(clamp("pids", limits.pids)),
            "stream_idle_timeout": clamp("stream_idle_timeout", limits.stream_idle_timeout),
            "stream_max_duration": clamp("stream_max_duration", limits.stream_max_duration),
        },
        "scaling": {
            "max_instances": int(clamp("max_instances", scaling.max_instances)),
            "min_free": int(clamp("min_free", scaling.min_free)),
            "idle_timeout": clamp("idle_timeout", scaling.idle_timeout),
        },
    }


# Environment names a function's `[env]` may not set. The instance server's own configuration (AUBE_*), what
# decides which code the interpreter and the dynamic loader run before the function does (PYTHON*, LD_*, PATH),
# and the names glibc itself distrusts for setuid programs (its "unsecure" list: loader, locale, resolver and
# allocator hooks).
RESERVED_ENV_PREFIXES = ("AUBE_", "LD_", "PYTHON", "MALLOC_", "GLIBC_")
RESERVED_ENV_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "GCONV_PATH",
        "GETCONF_DIR",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "LOCPATH",
        "NIS_PATH",
        "NLSPATH",
        "RESOLV_HOST_CONF",
        "RES_OPTIONS",
        "TMPDIR",
        "TZDIR",
    }
)


def reserved_env_reason(name: str) -> str | None:
    """Why `name` may not be set from `[env]`, or None when it may."""
    for prefix in RESERVED_ENV_PREFIXES:
        if name.startswith(prefix):
            return f"names starting with {prefix} are set by the platform only"
    if name in RESERVED_ENV_NAMES:
        return "it changes how the platform starts the function"
    return None
