"""Prometheus metric families and their text rendering (exposition format 0.0.4); pure: no I/O, no clock.

Every service's metrics are rendered here: the proxy's hot-path counters (plain ints, `aube.proxy.metrics`) through
the line writers (`family`, `sample`, `histogram`), the control plane's and the reaper's through the families
below, grouped in a `MetricSet`. Serving them over HTTP is `aube.shared.operator_http`'s.

Why not `prometheus-client`: its default registry is process-global (the tests run a control plane and a reaper in
one process), its counters take a lock per increment (the proxy adds to a counter per relayed chunk), and its
HTTP server is a thread beside the event loop. What the services need is these few families and a renderer.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, TypeVar

Kind = Literal["counter", "gauge", "histogram"]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds: from a claim (milliseconds) to a build with requirements (minutes).
DURATION_BUCKETS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


def number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def family(out: list[str], name: str, kind: Kind, help_text: str) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")


def sample(out: list[str], name: str, pairs: Iterable[tuple[str, str]], value: float) -> None:
    out.append(f"{name}{labels(pairs)} {number(value)}")


def histogram(
    out: list[str],
    name: str,
    bounds: Sequence[float],
    counts: Sequence[int],
    total: float,
    pairs: Sequence[tuple[str, str]] = (),
) -> None:
    """The samples of one histogram series; `counts` per bucket, not cumulative, the last one +Inf's."""
    cumulative = 0
    for bound, count in zip([*bounds, float("inf")], counts, strict=True):
        cumulative += count
        sample(out, f"{name}_bucket", [*pairs, ("le", number(bound))], cumulative)
    sample(out, f"{name}_sum", pairs, total)
    sample(out, f"{name}_count", pairs, cumulative)


class Family:
    """One metric family: a name, a help text, label names, and one value (or histogram) per label values."""

    kind: Kind

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        self.name = name
        self.help_text = help_text
        self.label_names = tuple(label_names)

    def _pairs(self, values: tuple[str, ...]) -> list[tuple[str, str]]:
        if len(values) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {values}")
        return list(zip(self.label_names, values, strict=True))

    def render(self, out: list[str]) -> None:
        family(out, self.name, self.kind, self.help_text)

    def sample_names(self) -> list[str]:
        """The names its samples carry (a histogram's `_bucket`, `_sum`, `_count`)."""
        return [self.name]


class Counter(Family):
    kind: Kind = "counter"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, label_names)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *label_values: str, amount: float = 1.0) -> None:
        self._pairs(label_values)
        self.values[label_values] = self.values.get(label_values, 0.0) + amount

    def get(self, *label_values: str) -> float:
        return self.values.get(label_values, 0.0)

    def render(self, out: list[str]) -> None:
        super().render(out)
        for key in sorted(self.values):
            sample(out, self.name, self._pairs(key), self.values[key])


class Gauge(Counter):
    """A value that goes up and down; `replace` sets the whole family from a fresh observation."""

    kind: Kind = "gauge"

    def set(self, *label_values: str, value: float) -> None:
        self._pairs(label_values)
        self.values[label_values] = value

    def replace(self, values: Mapping[tuple[str, ...], float]) -> None:
        for key in values:
            self._pairs(key)
        self.values = dict(values)


class Histogram(Family):
    kind: Kind = "histogram"

    def __init__(
        self, name: str, help_text: str, label_names: Sequence[str] = (), bounds: Sequence[float] = DURATION_BUCKETS
    ) -> None:
        super().__init__(name, help_text, label_names)
        self.bounds = tuple(bounds)
        self.series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}  # counts, [sum]

    def observe(self, value: float, *label_values: str) -> None:
        self._pairs(label_values)
        counts, total = self.series.setdefault(label_values, ([0] * (len(self.bounds) + 1), [0.0]))
        counts[bisect.bisect_left(self.bounds, value)] += 1
        total[0] += value

    def count(self, *label_values: str) -> int:
        got = self.series.get(label_values)
        return sum(got[0]) if got else 0

    def render(self, out: list[str]) -> None:
        super().render(out)
        for key in sorted(self.series):
            counts, total = self.series[key]
            histogram(out, self.name, self.bounds, counts, total[0], self._pairs(key))

    def sample_names(self) -> list[str]:
        return [f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count"]


F = TypeVar("F", bound=Family)


class MetricSet:
    """A service's families, rendered in the order they were made."""

    def __init__(self) -> None:
        self.families: list[Family] = []

    def counter(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, help_text, label_names))

    def gauge(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(name, help_text, label_names))

    def histogram(
        self, name: str, help_text: str, label_names: Sequence[str] = (), bounds: Sequence[float] = DURATION_BUCKETS
    ) -> Histogram:
        return self._add(Histogram(name, help_text, label_names, bounds))

    def _add(self, fam: F) -> F:
        if any(f.name == fam.name for f in self.families):
            raise ValueError(f"metric {fam.name} defined twice")
        self.families.append(fam)
        return fam

    def render(self) -> str:
        out: list[str] = []
        for fam in self.families:
            fam.render(out)
        return "\n".join(out) + "\n"

    def sample_names(self) -> set[str]:
        return {name for fam in self.families for name in fam.sample_names()}


def exported_names(text: str) -> set[str]:
    """The sample names in a Prometheus text exposition (what a query can select), from its samples and its `# TYPE`
    lines (a family with no samples yet is still exported)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.update([f"{name}_bucket", f"{name}_sum", f"{name}_count"] if kind == "histogram" else [name])
        elif line and not line.startswith("#"):
            names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names
