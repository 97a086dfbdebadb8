"""The generate extension for repository models, as Triton maps it: each field of the JSON body that names one of
the model's inputs becomes that input (a string or number: one element; an array: its elements), `parameters`
become the request's parameters; each response's outputs become fields of a JSON object (one element: the value;
more: a list; BYTES as text). A field naming no input is refused, naming the inputs there are.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from deskpod.backends import datatypes
from deskpod.backends.types import InferRequest, InferResponse
from deskpod.errors import InvalidRequest

RESERVED = ("id", "parameters")


def tensor_request(config: mc.ModelConfig, model: str, version: str, body: dict[str, Any]) -> InferRequest:
    names = {spec.name: spec for spec in config.input}
    unknown = [key for key in body if key not in names and key not in RESERVED]
    if unknown:
        raise InvalidRequest(
            f"model `{model}` has no input named {', '.join(map(repr, unknown))}: the body's fields are its inputs "
            f"({', '.join(names) or 'none'}) and `parameters`"
        )
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidRequest("`parameters` must be a JSON object")
    batching = config.max_batch_size > 0
    inputs = {name: _tensor(names[name], value, batching) for name, value in body.items() if name in names}
    return InferRequest(model=model, inputs=inputs, version=version, id=str(body.get("id", "")),
                        parameters=parameters)


def _tensor(spec: mc.ModelInput, value: Any, batching: bool) -> np.ndarray:
    dtype = datatypes.BY_ENUM[spec.data_type]
    try:
        if dtype.name == "BYTES":
            flat = np.array([v.encode() if isinstance(v, str) else v for v in np.ravel(np.array(value, dtype=object))],
                            dtype=np.object_)
        else:
            flat = np.ravel(np.asarray(value, dtype=dtype.dtype))
    except (TypeError, ValueError) as e:
        raise InvalidRequest(f"input `{spec.name}`: {value!r} is not {dtype.name}: {e}") from None
    dims = [1] * batching + [int(d) for d in spec.dims]
    if -1 in dims:  # the one variable dimension (the last, when several) takes what the fixed ones leave
        last = len(dims) - 1 - dims[::-1].index(-1)
        fixed = math.prod(d for i, d in enumerate(dims) if i != last and d != -1)
        dims = [1 if d == -1 else d for d in dims]
        dims[last] = flat.size // max(fixed, 1)
    if math.prod(dims) != flat.size:
        raise InvalidRequest(f"input `{spec.name}`: {flat.size} element(s) given; its shape {dims} needs {math.prod(dims)}")
    return flat.reshape(dims)


def tensor_event(response: InferResponse) -> dict[str, Any]:
    event: dict[str, Any] = {"model_name": response.model, "model_version": response.version}
    for name, value in response.outputs.items():
        items = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in np.ravel(value).tolist()]
        event[name] = items[0] if len(items) == 1 else items
    return event
