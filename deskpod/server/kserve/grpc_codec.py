"""gRPC's ModelInferRequest / ModelInferResponse (tritonclient's generated protobuf) <-> InferRequest /
InferResponse. Inputs come either all as `raw_input_contents` (what tritonclient sends) or all as typed
`contents`; outputs always go back as `raw_output_contents`, as Triton does."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from deskpod.backends.datatypes import v2_name_of
from deskpod.backends.types import InferRequest, InferResponse
from deskpod.errors import InvalidRequest
from deskpod.server.kserve import tensors
from deskpod.server.kserve.classification import check_k
from deskpod.server.kserve.shared_memory import BYTE_SIZE, REGION, SharedRef, SystemSharedMemory, shared_ref

# v2 datatype -> the InferTensorContents field that carries it typed (FP16 and BF16 travel raw only)
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

# python type -> InferParameter field; bool before int: True is an int too
PARAMETER_FIELDS = ((bool, "bool_param"), (int, "int64_param"), (float, "double_param"), (str, "string_param"))


def parameters_from_pb(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    return {key: getattr(value, value.WhichOneof("parameter_choice") or "string_param") for key, value in params.items()}


def parameters_to_pb(target: Any, params: Mapping[str, Any]) -> None:
    for key, value in params.items():
        for kind, attr in PARAMETER_FIELDS:
            if isinstance(value, kind):
                setattr(target[key], attr, value)
                break
        else:
            target[key].string_param = str(value)


def decode_request(request: pb.ModelInferRequest, shm: SystemSharedMemory | None = None) -> InferRequest:
    """The request; `shm`: the registered shared memory regions inputs may be read from."""
    raw = request.raw_input_contents
    refs = [shared_ref(f"input `{spec.name}`", parameters_from_pb(spec.parameters)) for spec in request.inputs]
    sent = len(refs) - sum(ref is not None for ref in refs)  # the inputs not in shared memory, in order
    if raw and len(raw) != sent:
        raise InvalidRequest(
            f"{sent} inputs outside shared memory but {len(raw)} raw_input_contents: send every such input raw, or none"
        )
    inputs: dict[str, np.ndarray] = {}
    i = -1  # the raw entry of the last input outside shared memory
    for spec, ref in zip(request.inputs, refs):
        if spec.name in inputs:
            raise InvalidRequest(f"input `{spec.name}` is given twice")
        if raw and spec.HasField("contents"):  # which one would be the input? Triton refuses it too
            raise InvalidRequest(f"input `{spec.name}` has both `contents` and raw_input_contents: send one")
        if ref is not None:
            if shm is None:
                raise InvalidRequest(f"input `{spec.name}`: this server has no shared memory regions")
            data = shm.read(f"input `{spec.name}`", ref)
            inputs[spec.name] = tensors.from_raw(spec.name, spec.datatype, list(spec.shape), data)
            continue
        i += 1
        inputs[spec.name] = (
            tensors.from_raw(spec.name, spec.datatype, list(spec.shape), raw[i]) if raw else _from_contents(spec)
        )
    classes = {out.name: check_k(out.name, parameters_from_pb(out.parameters)["classification"])
               for out in request.outputs if "classification" in out.parameters}
    return InferRequest(
        model=request.model_name,
        version=request.model_version,
        id=request.id,
        inputs=inputs,
        outputs=tuple(o.name for o in request.outputs) or None,
        parameters=parameters_from_pb(request.parameters),
        classification=classes,
    )


def _from_contents(spec: pb.ModelInferRequest.InferInputTensor) -> np.ndarray:
    field = CONTENTS.get(spec.datatype)
    if field is None:
        tensors.dtype_of(spec.name, spec.datatype)  # an unknown datatype says so
        raise InvalidRequest(f"input `{spec.name}`: {spec.datatype} must be sent in raw_input_contents")
    values = list(getattr(spec.contents, field))
    if spec.datatype == tensors.BYTES:
        return tensors.from_raw(spec.name, spec.datatype, list(spec.shape), tensors.encode_bytes_elements(np.array(values, dtype=object)))
    return tensors.from_json(spec.name, spec.datatype, list(spec.shape), values)


def shared_outputs(request: pb.ModelInferRequest) -> dict[str, SharedRef]:
    """The outputs the request wants written into shared memory."""
    refs = {out.name: shared_ref(f"output `{out.name}`", parameters_from_pb(out.parameters)) for out in request.outputs}
    return {name: ref for name, ref in refs.items() if ref is not None}


def encode_response(response: InferResponse, shared: Mapping[str, SharedRef] | None = None,
                    shm: SystemSharedMemory | None = None) -> pb.ModelInferResponse:
    """The response; outputs in `shared` are written into their regions and sent as shape and datatype (an empty
    raw_output_contents entry keeps the others' positions)."""
    message = pb.ModelInferResponse(model_name=response.model, model_version=response.version, id=response.id)
    for name, array in response.outputs.items():
        entry = message.outputs.add(name=name, datatype=v2_name_of(array), shape=list(array.shape))
        ref = (shared or {}).get(name)
        if ref is not None and shm is not None:
            shm.write(f"output '{name}'", ref, tensors.to_raw(array))
            parameters_to_pb(entry.parameters, {REGION: ref.region, BYTE_SIZE: ref.byte_size})
            message.raw_output_contents.append(b"")
            continue
        message.raw_output_contents.append(tensors.to_raw(array))
    parameters_to_pb(message.parameters, response.parameters)
    return message
