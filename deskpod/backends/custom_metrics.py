"""Python models' own metrics, as Triton's python_backend gives them (`pb_utils.MetricFamily`): a family of
one kind (COUNTER, GAUGE, HISTOGRAM) with a name and description; a Metric per label set; served on
/metrics after the server's own series (`exposition`), named exactly as the model names them, as Triton does.

    family = pb_utils.MetricFamily(name="preprocess_latency_ns", description="...", kind=pb_utils.MetricFamily.COUNTER)
    metric = family.Metric(labels={"model": "pre", "version": "1"})
    metric.increment(1234); metric.value()

A model runs in its own process: there each update is applied (so `value()` answers at once) and forwarded to
the server (`forward`, set by the stub), which applies it to its own families with `apply`.
"""

from __future__ import annotations

import bisect
import re
import threading
from collections.abc import Callable, Sequence

from prometheus_client.utils import floatToGoString

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_FAMILIES: dict[str, MetricFamily] = {}  # by name, for the collector
_LOCK = threading.Lock()
forward: Callable[[dict], None] | None = None  # in a model's process: how updates reach the server


class MetricFamily:
    COUNTER, GAUGE, HISTOGRAM = 0, 1, 2
    KINDS = {COUNTER: "counter", GAUGE: "gauge", HISTOGRAM: "histogram"}

    def __init__(self, name: str, description: str, kind: int):
        from deskpod.backends.python_utils import TritonModelException

        if not _NAME.fullmatch(name or ""):
            raise TritonModelException(f"MetricFamily: {name!r} is not a valid Prometheus metric name")
        if kind not in self.KINDS:
            raise TritonModelException("MetricFamily: kind must be MetricFamily.COUNTER, GAUGE or HISTOGRAM")
        self.name, self.description, self.kind = name, description, kind
        self._metrics: dict[tuple, _Metric] = {}
        with _LOCK:
            existing = _FAMILIES.get(name)
            if existing is not None and existing.kind != kind:
                raise TritonModelException(f"MetricFamily: {name!r} exists already as a {self.KINDS[existing.kind]}")
            _FAMILIES[name] = existing or self
        self._shared = _FAMILIES[name]  # two models may report into one family, as in Triton

    def Metric(self, labels: dict[str, str] | None = None, buckets: Sequence[float] | None = None) -> _Metric:  # noqa: N802 - Triton's name
        from deskpod.backends.python_utils import TritonModelException

        key = tuple(sorted((str(k), str(v)) for k, v in (labels or {}).items()))
        if (self.kind == self.HISTOGRAM) != (buckets is not None):
            raise TritonModelException("Metric: a HISTOGRAM needs buckets, and only a histogram takes them")
        with _LOCK:
            return self._shared._metrics.setdefault(key, _Metric(self._shared, key, buckets))

    def exposition(self) -> list[str]:
        """Prometheus text lines, the family's name as the model gave it (Triton adds no `_total`)."""
        kind = self.KINDS[self.kind]
        lines = [f"# HELP {self.name} {_escape_help(self.description)}", f"# TYPE {self.name} {kind}"]
        for key, metric in list(self._metrics.items()):
            if self.kind != self.HISTOGRAM:
                lines.append(f"{self.name}{_labels(key)} {floatToGoString(metric.value())}")
                continue
            for bound, count in metric.histogram():
                lines.append(f"{self.name}_bucket{_labels(key + (('le', bound),))} {floatToGoString(count)}")
            lines.append(f"{self.name}_sum{_labels(key)} {floatToGoString(metric.sum)}")
            lines.append(f"{self.name}_count{_labels(key)} {floatToGoString(sum(metric._counts))}")
        return lines


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _labels(key: tuple) -> str:
    if not key:
        return ""
    return "{" + ",".join(f'{name}="{_escape_label(str(value))}"' for name, value in key) + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r'\"').replace("\n", r"\n")


class _Metric:
    def __init__(self, family: MetricFamily, key: tuple, buckets: Sequence[float] | None):
        self.family, self.kind, self.key = family, family.kind, key
        self.buckets = sorted(float(b) for b in buckets) if buckets is not None else []
        self._value, self.sum, self._counts = 0.0, 0.0, [0] * (len(self.buckets) + 1)
        self._lock = threading.Lock()

    def increment(self, value: float) -> None:
        from deskpod.backends.python_utils import TritonModelException

        if self.kind == MetricFamily.HISTOGRAM:
            raise TritonModelException("Metric: a histogram is observed, not incremented")
        if self.kind == MetricFamily.COUNTER and value < 0:
            raise TritonModelException("Metric: a counter cannot be incremented by a negative value")
        with self._lock:
            self._value += value
        self._forward("increment", value)

    def set(self, value: float) -> None:  # noqa: A003 - Triton's name
        from deskpod.backends.python_utils import TritonModelException

        if self.kind != MetricFamily.GAUGE:
            raise TritonModelException("Metric: only a gauge can be set")
        with self._lock:
            self._value = float(value)
        self._forward("set", value)

    def observe(self, value: float) -> None:
        from deskpod.backends.python_utils import TritonModelException

        if self.kind != MetricFamily.HISTOGRAM:
            raise TritonModelException("Metric: only a histogram observes values")
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value
        self._forward("observe", value)

    def value(self) -> float:
        return self._value

    def _forward(self, method: str, value: float) -> None:
        if forward is not None:
            family = self.family
            forward({"name": family.name, "description": family.description, "kind": family.kind,
                     "labels": dict(self.key), "buckets": self.buckets if self.kind == MetricFamily.HISTOGRAM else None,
                     "method": method, "value": value})

    def histogram(self) -> list[tuple[str, float]]:
        """Cumulative counts per upper bound, +Inf last (Prometheus' form)."""
        total, out = 0, []
        for bound, count in zip([*self.buckets, float("inf")], self._counts):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


def apply(update: dict) -> None:
    """In the server: one update a model's process forwarded (its family and metric made when first seen)."""
    family = MetricFamily(update["name"], update["description"], update["kind"])
    metric = family.Metric(labels=update["labels"], buckets=update["buckets"])
    getattr(metric, update["method"])(update["value"])


def exposition() -> str:
    """Every Python model's metric families as Prometheus text, for /metrics after the server's own series."""
    with _LOCK:
        families = list(_FAMILIES.values())
    return "".join(line + "\n" for family in families for line in family.exposition())
