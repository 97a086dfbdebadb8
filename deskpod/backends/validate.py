"""Check a request against its model's config before it is queued: every problem is an InvalidRequest whose
message names the tensor and says what the model expects. Built once per loaded model (this is on every
request's path)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from deskpod.errors import InvalidRequest

from . import datatypes
from .base import Pending
from .types import InferRequest


def expected_shape(config: mc.ModelConfig, tensor: mc.ModelInput | mc.ModelOutput) -> list[int]:
    """The shape a client sees: the config's dims, after a -1 batch dimension when the model batches."""
    return ([-1] if config.max_batch_size > 0 else []) + list(tensor.dims)


@dataclass(frozen=True)
class _Input:
    name: str
    datatype: str  # v2 name
    dtype: np.dtype
    shape: tuple[int, ...]  # as the client sends it, -1 = any size
    reshape: tuple[int, ...] | None  # what the backend takes instead (after the batch dimension)
    optional: bool


class Validator:
    def __init__(self, config: mc.ModelConfig, sequence=None) -> None:
        """`sequence`: a stateful model's SequenceBatcher, whose control and state inputs and state outputs
        the model takes beside the config's (the batcher adds them; a client may not)."""
        self.model = f"model {config.name!r}"
        self.max_batch_size = config.max_batch_size
        self.inputs = {
            t.name: _Input(
                t.name,
                datatypes.v2_name(t.data_type),
                datatypes.BY_ENUM[t.data_type].dtype,
                tuple(expected_shape(config, t)),
                tuple(t.reshape.shape) if t.HasField("reshape") else None,
                t.optional,
            )
            for t in config.input
        }
        self.outputs = tuple(t.name for t in config.output)
        self.internal_outputs = sequence.state_outputs if sequence else ()
        self.extra = sequence.extra_inputs if sequence else {}
        for name, (dtype, dims) in self.extra.items():
            batch = (-1,) if config.max_batch_size > 0 else ()
            self.inputs[name] = _Input(name, datatypes.v2_name_of(np.empty(0, dtype)), dtype, batch + dims, None, False)

    def prepare(self, request: InferRequest) -> Pending:
        if self.extra and "_sequence" not in request.parameters:
            given = [name for name in request.inputs if name in self.extra]
            if given:
                raise InvalidRequest(f"input {given[0]!r} of {self.model} is given by the sequence batcher, not the client")
        for name in request.inputs:
            if name not in self.inputs:
                raise InvalidRequest(f"unknown input {name!r} for {self.model}; its inputs are: {', '.join(self.inputs)}")
        inputs: dict[str, np.ndarray] = {}
        batch_sizes: set[int] = set()
        for name, spec in self.inputs.items():
            value = request.inputs.get(name)
            if value is None:
                if spec.optional:
                    continue
                raise InvalidRequest(
                    f"missing input {name!r} for {self.model}: it expects {spec.datatype} with shape {list(spec.shape)}"
                )
            value = self._check(spec, np.asarray(value))
            if self.max_batch_size > 0:
                batch_sizes.add(value.shape[0])
            inputs[name] = self._reshape(spec, value)
        if len(batch_sizes) > 1:
            raise InvalidRequest(
                f"the inputs of a request to {self.model} must share one batch size; got {sorted(batch_sizes)}"
            )
        batch_size = batch_sizes.pop() if batch_sizes else 1
        skip = 1 if self.max_batch_size > 0 else 0
        key = tuple((n, v.shape[skip:]) for n, v in inputs.items())
        return Pending(request, inputs, self._requested_outputs(request), batch_size, key)

    def _check(self, spec: _Input, value: np.ndarray) -> np.ndarray:
        if value.dtype != spec.dtype:
            got = _v2_name_or_none(value)
            if got != spec.datatype:
                raise InvalidRequest(
                    f"input {spec.name!r} has datatype {got or value.dtype}; {self.model} expects {spec.datatype}"
                )
        if spec.datatype == "BYTES":
            value = datatypes.as_bytes_array(value)
        shape = spec.shape
        if value.ndim != len(shape) or any(e != -1 and e != g for e, g in zip(shape, value.shape)):
            batch_note = ", the first is the batch dimension" if self.max_batch_size > 0 else ""
            raise InvalidRequest(
                f"input {spec.name!r} has shape {list(value.shape)}; {self.model} expects {list(shape)} "
                f"(-1: any size{batch_note})"
            )
        if self.max_batch_size > 0 and not 1 <= value.shape[0] <= self.max_batch_size:
            raise InvalidRequest(
                f"input {spec.name!r} has batch size {value.shape[0]}; {self.model} takes 1 to "
                f"max_batch_size {self.max_batch_size} per request"
            )
        return value

    def _reshape(self, spec: _Input, value: np.ndarray) -> np.ndarray:
        if spec.reshape is None:
            return value
        batch = (value.shape[0],) if self.max_batch_size > 0 else ()
        return value.reshape(batch + spec.reshape)

    def _requested_outputs(self, request: InferRequest) -> tuple[str, ...]:
        return self._client_outputs(request) + self.internal_outputs  # a sequence's state is always computed

    def _client_outputs(self, request: InferRequest) -> tuple[str, ...]:
        if request.outputs is None:
            return self.outputs
        for name in request.outputs:
            if name not in self.outputs:
                raise InvalidRequest(
                    f"unknown output {name!r} requested from {self.model}; its outputs are: {', '.join(self.outputs)}"
                )
        return tuple(n for n in self.outputs if n in request.outputs)


def _v2_name_or_none(value: np.ndarray) -> str | None:
    try:
        return datatypes.v2_name_of(value)
    except ValueError:
        return None
