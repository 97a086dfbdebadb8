"""Check a request against its model's config before it is queued: every problem is an InvalidRequest whose
message names the tensor and says what the model expects."""

from __future__ import annotations

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from deskpod.errors import InvalidRequest

from . import datatypes
from .base import Pending
from .types import InferRequest


def expected_shape(config: mc.ModelConfig, tensor: mc.ModelInput | mc.ModelOutput) -> list[int]:
    """The shape a client sees: the config's dims, after a -1 batch dimension when the model batches."""
    return ([-1] if config.max_batch_size > 0 else []) + list(tensor.dims)


def prepare(config: mc.ModelConfig, request: InferRequest) -> Pending:
    model = f"model {config.name!r}"
    declared = {t.name: t for t in config.input}
    for name in request.inputs:
        if name not in declared:
            raise InvalidRequest(f"unknown input {name!r} for {model}; its inputs are: {', '.join(declared)}")
    inputs: dict[str, np.ndarray] = {}
    batch_sizes: set[int] = set()
    for name, spec in declared.items():
        if name not in request.inputs:
            if spec.optional:
                continue
            raise InvalidRequest(
                f"missing input {name!r} for {model}: it expects {datatypes.v2_name(spec.data_type)} "
                f"with shape {expected_shape(config, spec)}"
            )
        value = _check_input(config, spec, np.asarray(request.inputs[name]), model)
        if config.max_batch_size > 0:
            batch_sizes.add(value.shape[0])
        inputs[name] = _reshape(config, spec, value)
    if len(batch_sizes) > 1:
        raise InvalidRequest(f"the inputs of a request to {model} must share one batch size; got {sorted(batch_sizes)}")
    outputs = _requested_outputs(config, request, model)
    batch_size = batch_sizes.pop() if batch_sizes else 1
    key = tuple((n, v.shape[1:] if config.max_batch_size > 0 else v.shape) for n, v in inputs.items())
    return Pending(request, inputs, outputs, batch_size, key)


def _check_input(config: mc.ModelConfig, spec: mc.ModelInput, value: np.ndarray, model: str) -> np.ndarray:
    expected_type = datatypes.v2_name(spec.data_type)
    got_type = _v2_name_or_none(value)
    if got_type != expected_type:
        raise InvalidRequest(
            f"input {spec.name!r} has datatype {got_type or value.dtype}; {model} expects {expected_type}"
        )
    if expected_type == "BYTES":
        value = datatypes.as_bytes_array(value)
    shape = expected_shape(config, spec)
    if value.ndim != len(shape) or any(e != -1 and e != g for e, g in zip(shape, value.shape)):
        raise InvalidRequest(
            f"input {spec.name!r} has shape {list(value.shape)}; {model} expects {shape} (-1: any size"
            + (", the first is the batch dimension)" if config.max_batch_size > 0 else ")")
        )
    if config.max_batch_size > 0 and not 1 <= value.shape[0] <= config.max_batch_size:
        raise InvalidRequest(
            f"input {spec.name!r} has batch size {value.shape[0]}; {model} takes 1 to "
            f"max_batch_size {config.max_batch_size} per request"
        )
    return value


def _v2_name_or_none(value: np.ndarray) -> str | None:
    try:
        return datatypes.v2_name_of(value)
    except ValueError:
        return None


def _reshape(config: mc.ModelConfig, spec: mc.ModelInput, value: np.ndarray) -> np.ndarray:
    if not spec.HasField("reshape"):
        return value
    batch = (value.shape[0],) if config.max_batch_size > 0 else ()
    return value.reshape(batch + tuple(spec.reshape.shape))


def _requested_outputs(config: mc.ModelConfig, request: InferRequest, model: str) -> tuple[str, ...]:
    names = [t.name for t in config.output]
    if request.outputs is None:
        return tuple(names)
    for name in request.outputs:
        if name not in names:
            raise InvalidRequest(f"unknown output {name!r} requested from {model}; its outputs are: {', '.join(names)}")
    return tuple(n for n in names if n in request.outputs)
