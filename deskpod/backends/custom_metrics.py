"""Python models' own metrics, as Triton's python_backend gives them (`pb_utils.MetricFamily`): a family of
one kind (COUNTER, GAUGE, HISTOGRAM) with a name and description; a Metric per label set; served on
/metrics beside the server's own series (CustomMetricsCollector).

    family = pb_utils.MetricFamily(name="preprocess_latency_ns", description="...", kind=pb_utils.MetricFamily.COUNTER)
    metric = family.Metric(labels={"model": "pre", "version": "1"})
    metric.increment(1234); metric.value()
"""

from __future__ import annotations

import bisect
import re
import threading
from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_FAMILIES: dict[str, MetricFamily] = {}  # by name, for the collector
_LOCK = threading.Lock()


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
            return self._shared._metrics.setdefault(key, _Metric(self._shared.kind, key, buckets))

    def collect(self) -> Metric:
        kind = self.KINDS[self.kind]
        label_names = sorted({k for key in self._metrics for k, _ in key})
        family = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily,
                  "histogram": HistogramMetricFamily}[kind](self.name, self.description, labels=label_names)
        for key, metric in list(self._metrics.items()):
            values = dict(key)
            labels = [values.get(n, "") for n in label_names]
            if self.kind == self.HISTOGRAM:
                family.add_metric(labels, metric.histogram(), metric.sum)
            else:
                family.add_metric(labels, metric.value())
        return family


class _Metric:
    def __init__(self, kind: int, key: tuple, buckets: Sequence[float] | None):
        self.kind, self.key = kind, key
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

    def set(self, value: float) -> None:  # noqa: A003 - Triton's name
        from deskpod.backends.python_utils import TritonModelException

        if self.kind != MetricFamily.GAUGE:
            raise TritonModelException("Metric: only a gauge can be set")
        with self._lock:
            self._value = float(value)

    def observe(self, value: float) -> None:
        from deskpod.backends.python_utils import TritonModelException

        if self.kind != MetricFamily.HISTOGRAM:
            raise TritonModelException("Metric: only a histogram observes values")
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value

    def value(self) -> float:
        return self._value

    def histogram(self) -> list[tuple[str, float]]:
        """Cumulative counts per upper bound, +Inf last (Prometheus' form)."""
        total, out = 0, []
        for bound, count in zip([*self.buckets, float("inf")], self._counts):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


class CustomMetricsCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        with _LOCK:
            families = list(_FAMILIES.values())
        for family in families:
            yield family.collect()
