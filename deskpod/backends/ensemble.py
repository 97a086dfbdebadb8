"""Ensembles (platform "ensemble"): a DAG of models wired by tensor names. Each step maps its model's inputs
from ensemble tensors (input_map: model input -> ensemble tensor) and publishes its outputs under ensemble
names (output_map: model output -> ensemble tensor). A step starts as soon as all its inputs exist, so
independent steps run concurrently; each step is an ordinary request to the repository (with its batching)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from deskpod.errors import DeskpodError

from .base import Outputs, Pending
from .stats import ExecutionTimes, ModelStats
from .types import InferRequest, InferResponse

Infer = Callable[[InferRequest], Awaitable[InferResponse]]


class EnsembleScheduler:
    def __init__(self, config: mc.ModelConfig, infer: Infer, stats: ModelStats) -> None:
        self.config = config
        self.steps = list(config.ensemble_scheduling.step)
        self.infer = infer
        self.stats = stats

    async def submit(self, pending: Pending) -> Outputs:
        start = time.perf_counter_ns()
        pending.queue_ns = 0
        tensors: dict[str, np.ndarray] = dict(pending.inputs)
        waiting = set(range(len(self.steps)))
        running: dict[asyncio.Task, int] = {}
        try:
            while waiting or running:
                for i in sorted(waiting):
                    if all(name in tensors for name in self.steps[i].input_map.values()):
                        waiting.discard(i)
                        running[asyncio.ensure_future(self._step(i, tensors, pending.request))] = i
                if not running:  # validate_ensemble rules this out at load; kept as a guard
                    raise DeskpodError(f"ensemble {self.config.name!r}: steps {sorted(waiting)} can never start")
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    step = self.steps[running.pop(task)]
                    outputs = task.result()
                    for model_output, tensor in step.output_map.items():
                        tensors[tensor] = outputs[model_output]
        finally:
            for task in running:
                task.cancel()
        infer_ns = time.perf_counter_ns() - start
        self.stats.record_execution(ExecutionTimes(pending.batch_size, 1, 0, infer_ns, 0))
        return {name: tensors[name] for name in pending.outputs}

    async def _step(self, index: int, tensors: dict[str, np.ndarray], request: InferRequest) -> Outputs:
        step = self.steps[index]
        version = str(step.model_version) if step.model_version > 0 else ""
        inputs = {model_input: tensors[tensor] for model_input, tensor in step.input_map.items()}
        try:
            response = await self.infer(
                InferRequest(step.model_name, inputs, version, request.id, tuple(step.output_map), request.parameters)
            )
        except DeskpodError as e:  # same class (status), with where in the ensemble it happened
            raise type(e)(f"ensemble {self.config.name!r} step {index} (model {step.model_name!r}): {e}") from e
        return response.outputs

    def close(self) -> None:
        pass  # the steps' models are the repository's; an ensemble holds nothing of its own
