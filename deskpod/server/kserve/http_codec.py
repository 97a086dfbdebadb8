"""The v2 HTTP inference body <-> InferRequest / InferResponse.

A body is a JSON header, optionally followed by the binary tensor data extension's blobs: the header's
length is the `Inference-Header-Content-Length` HTTP header, and each input sent as binary names its size
in `parameters.binary_data_size`, in the order of `inputs`. Outputs come back as binary blobs the same way
when the request asks (`parameters.binary_data_output` for all, an output's own `parameters.binary_data`
for one), as JSON `data` otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from deskpod.backends.datatypes import v2_name_of
from deskpod.backends.types import InferRequest, InferResponse
from deskpod.errors import InvalidRequest
from deskpod.server.kserve import tensors
from deskpod.server.kserve.classification import check_k
from deskpod.server.kserve.shared_memory import BYTE_SIZE, OFFSET, REGION, SharedRef, SystemSharedMemory, shared_ref

HEADER_LENGTH = "Inference-Header-Content-Length"
# request parameters that steer the protocol rather than the model: not passed on to it
PROTOCOL_PARAMETERS = frozenset({"binary_data_output"})


@dataclass(frozen=True)
class OutputFormat:
    """How the client wants each output back: binary blob or JSON data."""

    binary_default: bool = False
    binary: Mapping[str, bool] = field(default_factory=dict)
    shared: Mapping[str, SharedRef] = field(default_factory=dict)  # outputs written into shared memory

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.binary_default)


def parse_header_length(value: str | None, body_size: int) -> int | None:
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise InvalidRequest(f"{HEADER_LENGTH} must be an integer, got {value!r}") from None
    if not 0 < length <= body_size:
        raise InvalidRequest(f"{HEADER_LENGTH} is {length}, but the body holds {body_size} bytes")
    return length


def parse_json_header(data: bytes | memoryview) -> dict:
    try:
        header = json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"the request body is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise InvalidRequest("the request body must be a JSON object with `inputs`")
    return header


def _object(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _list(value: Any, what: str) -> list:
    if not isinstance(value, list):
        raise InvalidRequest(f"{what} must be a list, got {type(value).__name__}")
    return value


def decode_request(
    body: bytes, header_length: str | None, model: str, version: str = "", shm: SystemSharedMemory | None = None
) -> tuple[InferRequest, OutputFormat]:
    """The request a v2 body asks for, and how its outputs should be sent back; `shm`: the registered shared
    memory regions inputs may be read from."""
    length = parse_header_length(header_length, len(body))
    view = memoryview(body)
    header = parse_json_header(view if length is None else view[:length])
    blobs = view[len(body) if length is None else length :]
    if "inputs" not in header:
        raise InvalidRequest("the body needs `inputs`: a list of tensors, each with name, shape, datatype and data")
    inputs, used = {}, 0
    for i, spec in enumerate(_list(header["inputs"], "`inputs`")):
        tensor, size = _decode_input(_object(spec, f"inputs[{i}]"), i, blobs[used:], shm)
        if tensor[0] in inputs:
            raise InvalidRequest(f"input `{tensor[0]}` is given twice")
        inputs[tensor[0]] = tensor[1]
        used += size
    if used != len(blobs):
        raise InvalidRequest(
            f"the body has {len(blobs)} bytes of binary data after the JSON header, but the inputs' "
            f"binary_data_size add up to {used}"
        )
    parameters = _object(header.get("parameters"), "`parameters`")
    outputs, fmt, classes = _decode_outputs(header.get("outputs"), bool(parameters.get("binary_data_output", False)))
    request = InferRequest(
        model=model,
        version=version,
        id=str(header.get("id", "")),
        inputs=inputs,
        outputs=outputs,
        parameters={k: v for k, v in parameters.items() if k not in PROTOCOL_PARAMETERS},
        classification=classes,
    )
    return request, fmt


def _decode_input(spec: dict, index: int, blobs: memoryview,
                  shm: SystemSharedMemory | None = None) -> tuple[tuple[str, Any], int]:
    """((name, array), binary bytes consumed) for one entry of `inputs`."""
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"inputs[{index}] needs a `name`")
    for key in ("shape", "datatype"):
        if key not in spec:
            raise InvalidRequest(f"input `{name}` needs a `{key}`")
    params = _object(spec.get("parameters"), f"input `{name}`: `parameters`")
    ref = shared_ref(f"input `{name}`", params)
    if ref is not None:
        if shm is None:
            raise InvalidRequest(f"input `{name}`: this server has no shared memory regions")
        data = shm.read(f"input `{name}`", ref)
        return (name, tensors.from_raw(name, spec["datatype"], spec["shape"], data)), 0
    size = params.get("binary_data_size")
    if size is None:
        if "data" not in spec:
            raise InvalidRequest(f"input `{name}` has neither `data` nor parameters.binary_data_size")
        return (name, tensors.from_json(name, spec["datatype"], spec["shape"], spec["data"])), 0
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidRequest(f"input `{name}`: binary_data_size must be an integer >= 0, got {size!r}")
    if size > len(blobs):
        raise InvalidRequest(
            f"input `{name}`: binary_data_size is {size}, but only {len(blobs)} bytes of binary data are left"
        )
    return (name, tensors.from_raw(name, spec["datatype"], spec["shape"], blobs[:size])), size


def _decode_outputs(specs: Any, binary_default: bool) -> tuple[tuple[str, ...] | None, OutputFormat, dict[str, int]]:
    """The outputs asked for, how each is written, and those asked for as classifications (their k)."""
    if specs is None:
        return None, OutputFormat(binary_default), {}
    names, binary, classes, shared = [], {}, {}, {}
    for i, spec in enumerate(_list(specs, "`outputs`")):
        spec = _object(spec, f"outputs[{i}]")
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"outputs[{i}] needs a `name`")
        params = _object(spec.get("parameters"), f"output `{name}`: `parameters`")
        if "classification" in params:
            classes[name] = check_k(name, params["classification"])
        ref = shared_ref(f"output `{name}`", params)
        if ref is not None:
            shared[name] = ref
        names.append(name)
        binary[name] = bool(params.get("binary_data", binary_default))
    return tuple(names), OutputFormat(binary_default, binary, shared), classes


def encode_response(response: InferResponse, fmt: OutputFormat,
                    shm: SystemSharedMemory | None = None) -> tuple[bytes, int | None]:
    """(body, JSON header length or None when the body is all JSON); outputs asked for in shared memory are
    written there and answered with their shape and datatype."""
    outputs, blobs = [], []
    for name, array in response.outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": v2_name_of(array), "shape": list(array.shape)}
        ref = fmt.shared.get(name)
        if ref is not None:
            if shm is None:
                raise InvalidRequest(f"output `{name}`: this server has no shared memory regions")
            shm.write(f"output '{name}'", ref, tensors.to_raw(array))
            entry["parameters"] = {REGION: ref.region, BYTE_SIZE: ref.byte_size, **({OFFSET: ref.offset} if ref.offset else {})}
        elif fmt.is_binary(name):
            blobs.append(tensors.to_raw(array))
            entry["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            entry["data"] = tensors.to_json(array)
        outputs.append(entry)
    header: dict[str, Any] = {"model_name": response.model, "model_version": response.version, "outputs": outputs}
    if response.id:
        header["id"] = response.id
    if response.parameters:
        header["parameters"] = dict(response.parameters)
    text = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return text, None
    return b"".join([text, *blobs]), len(text)
