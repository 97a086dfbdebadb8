"""What every backend implements, and the request as it travels from validation through the batcher.

A backend module exposes `create_instance(config, model_file, context) -> Instance`, and optionally
`complete_config(config, explicit_fields, model_file, backend_config)` to fill what config.pbtxt leaves out (Triton's
auto-complete). An Instance executes a list of requests on its own worker thread (or, when its `execute` is a
coroutine, on the server's loop: an instance whose work happens in another process) and answers one result per
request: outputs, or the exception that failed that request alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from deskpod.errors import BackendError

from .types import InferRequest

Outputs = dict[str, np.ndarray]
Result = Outputs | BaseException


@dataclass
class Pending:
    """A validated request waiting for (or in) an execution."""

    request: InferRequest
    inputs: dict[str, np.ndarray]  # checked against the config, reshaped to what the backend takes
    outputs: tuple[str, ...]  # requested output names, in the config's order
    batch_size: int  # the first dimension when the model batches, else 1
    batch_key: tuple  # requests are merged only when their keys are equal (same non-batch shapes)
    arrival_ns: int = field(default_factory=time.perf_counter_ns)
    queue_ns: int | None = None
    # a decoupled model's request: where each of its responses goes (result, final), on the server's loop;
    # its execution then answers None, the responses coming through here
    sink: Callable[[Result | None, bool], None] | None = None
    future: asyncio.Future = field(init=False, repr=False)  # set when queued by the batcher


@dataclass(frozen=True)
class ModelContext:
    """What an instance may know about where it runs (Triton's initialize() args come from here)."""

    name: str
    version: str
    repository: Path
    instance_name: str
    instance_index: int
    instance_count: int
    # the repository's infer and infer_stream, for backends that call other models (Python BLS); called on
    # `Execution.loop`
    infer: Callable[[InferRequest], Any] | None = None
    infer_stream: Callable[[InferRequest], Any] | None = None
    backend_config: Mapping[str, str] = field(default_factory=dict)  # --backend-config BACKEND,KEY=VALUE
    # an instance that can no longer serve (its process cannot start again) says why: the version is UNAVAILABLE
    unavailable: Callable[[str], None] = lambda reason: None


class Execution:
    """Timing of one execution by stage (compute_input, compute_infer, compute_output), and the event loop
    that scheduled it (for backends that call back into the repository)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop
        self.ns: dict[str, int] = {"compute_input": 0, "compute_infer": 0, "compute_output": 0}
        self._last = time.perf_counter_ns()

    def lap(self, stage: str) -> None:
        now = time.perf_counter_ns()
        self.ns[stage] += now - self._last
        self._last = now


class Instance(Protocol):
    def execute(self, batch: Sequence[Pending], execution: Execution) -> list[Result]: ...

    def close(self) -> None: ...


class TensorInstance:
    """Base for backends that run one merged tensor batch (onnxruntime, pytorch): requests are concatenated
    along the batch dimension, run once, and the outputs split back by each request's batch size."""

    def __init__(self, config: mc.ModelConfig) -> None:
        self.config = config
        self.output_names = tuple(t.name for t in config.output)
        self.output_reshape = {
            t.name: tuple(t.dims) for t in config.output if t.HasField("reshape")
        }

    def run(self, inputs: dict[str, np.ndarray]) -> Outputs:
        raise NotImplementedError

    def execute(self, batch: Sequence[Pending], execution: Execution) -> list[Result]:
        merged = _merge(batch)
        execution.lap("compute_input")
        outputs = self.run(merged)
        execution.lap("compute_infer")
        results = self._split(outputs, batch)
        execution.lap("compute_output")
        return results

    def close(self) -> None:
        pass

    def _split(self, outputs: Outputs, batch: Sequence[Pending]) -> list[Result]:
        batching = self.config.max_batch_size > 0
        total = sum(p.batch_size for p in batch)
        for name, value in outputs.items():
            if batching and (value.ndim == 0 or value.shape[0] != total):
                raise BackendError(
                    f"model {self.config.name!r} returned output {name!r} with shape {list(value.shape)}; "
                    f"its first dimension should be the batch size {total}"
                )
        results: list[Result] = []
        start = 0
        for p in batch:
            end = start + p.batch_size
            part = {n: outputs[n][start:end] if batching else outputs[n] for n in p.outputs}
            results.append({n: self._reshape(n, v, p.batch_size) for n, v in part.items()})
            start = end
        return results

    def _reshape(self, name: str, value: np.ndarray, batch_size: int) -> np.ndarray:
        dims = self.output_reshape.get(name)
        if dims is None:
            return value
        return value.reshape(((batch_size,) if self.config.max_batch_size > 0 else ()) + dims)


def _merge(batch: Sequence[Pending]) -> dict[str, np.ndarray]:
    if len(batch) == 1:
        return batch[0].inputs
    return {name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs}
