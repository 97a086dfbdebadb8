"""Per model-version statistics in Triton's model_stats JSON shape: cumulative counts and nanoseconds.

Durations follow Triton's meaning: `queue` from arrival to the start of the execution that takes the request,
`compute_input` preparing the batch (validating, concatenating), `compute_infer` the backend's execution,
`compute_output` splitting and handing back outputs, `success`/`fail` the whole request. `batch_stats` has
one entry per executed batch size (the sum of the batch dimensions of the requests executed together).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

STAGES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")
BATCH_STAGES = ("compute_input", "compute_infer", "compute_output")


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def as_dict(self) -> dict:
        return {"count": self.count, "ns": self.ns}


@dataclass
class ExecutionTimes:
    """What one backend execution measured (nanoseconds), reported by the scheduler to ModelStats."""

    batch_size: int
    requests: int
    compute_input_ns: int
    compute_infer_ns: int
    compute_output_ns: int


@dataclass
class ModelStats:
    name: str
    version: str
    inference_count: int = 0
    execution_count: int = 0
    last_inference: int = 0  # milliseconds since the epoch
    stages: dict[str, Duration] = field(default_factory=lambda: {s: Duration() for s in STAGES})
    batches: dict[int, dict[str, Duration]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_execution(self, times: ExecutionTimes) -> None:
        with self._lock:
            self.execution_count += 1
            per_batch = self.batches.setdefault(times.batch_size, {s: Duration() for s in BATCH_STAGES})
            for stage, ns in zip(BATCH_STAGES, (times.compute_input_ns, times.compute_infer_ns, times.compute_output_ns)):
                per_batch[stage].add(ns)
                # each request of the batch is charged the execution's time, as Triton does
                self.stages[stage].add(ns * times.requests, times.requests)

    def record_request(self, ok: bool, batch_size: int, total_ns: int, queue_ns: int | None) -> None:
        with self._lock:
            self.last_inference = time.time_ns() // 1_000_000
            self.stages["success" if ok else "fail"].add(total_ns)
            if queue_ns is not None:
                self.stages["queue"].add(queue_ns)
            if ok:
                self.inference_count += batch_size

    def as_dict(self) -> dict:
        with self._lock:
            return {
                "name": self.name,
                "version": self.version,
                "last_inference": self.last_inference,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {s: d.as_dict() for s, d in self.stages.items()},
                "batch_stats": [
                    {"batch_size": size, **{s: d.as_dict() for s, d in stages.items()}}
                    for size, stages in sorted(self.batches.items())
                ],
            }
