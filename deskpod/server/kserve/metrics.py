"""Triton's inference metrics, read from the repository's statistics when Prometheus scrapes.

Each series has labels {model, version} and keeps Triton's exact name, so Triton's dashboards and
queries work unchanged. They are counters, but declared untyped: prometheus_client writes a counter's
samples as NAME_total, which would not be Triton's name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import Metric, UnknownMetricFamily
from prometheus_client.registry import Collector

# metric name -> (help, how to read it from one model_stats entry)
NV_METRICS: dict[str, tuple[str, Callable[[dict], float]]] = {
    "nv_inference_request_success": (
        "Number of successful inference requests, all batch sizes", lambda s: s["inference_stats"]["success"]["count"]
    ),
    "nv_inference_request_failure": (
        "Number of failed inference requests, all batch sizes", lambda s: s["inference_stats"]["fail"]["count"]
    ),
    "nv_inference_count": ("Number of inferences performed (a batch of n counts n)", lambda s: s["inference_count"]),
    "nv_inference_exec_count": ("Number of model executions performed (a batch counts once)", lambda s: s["execution_count"]),
    "nv_inference_request_duration_us": (
        "Cumulative inference request duration in microseconds", lambda s: _us(s, "success")
    ),
    "nv_inference_queue_duration_us": ("Cumulative inference queuing duration in microseconds", lambda s: _us(s, "queue")),
    "nv_inference_compute_input_duration_us": (
        "Cumulative compute input duration in microseconds", lambda s: _us(s, "compute_input")
    ),
    "nv_inference_compute_infer_duration_us": (
        "Cumulative compute inference duration in microseconds", lambda s: _us(s, "compute_infer")
    ),
    "nv_inference_compute_output_duration_us": (
        "Cumulative inference compute output duration in microseconds", lambda s: _us(s, "compute_output")
    ),
}


def _us(stats: dict, phase: str) -> float:
    return stats["inference_stats"][phase]["ns"] / 1000


class TritonCollector(Collector):
    """`statistics` returns Triton's model_stats entries (the repository's statistics())."""

    def __init__(self, statistics: Callable[[], list[dict[str, Any]]]):
        self.statistics = statistics

    def collect(self) -> Iterator[Metric]:
        families = {
            name: UnknownMetricFamily(name, doc, labels=["model", "version"]) for name, (doc, _) in NV_METRICS.items()
        }
        for stats in self.statistics():
            labels = [stats["name"], str(stats["version"])]
            for name, (_, read) in NV_METRICS.items():
                families[name].add_metric(labels, float(read(stats)))
        yield from families.values()
