"""`triton_python_backend_utils` as Triton's Python backend gives it to model.py (Tensor, InferenceRequest,
InferenceResponse, TritonError, get_input_tensor_by_name, response senders, ...), so an existing Triton Python
model runs unchanged. It lives in the model's own process (python_stub installs it as
sys.modules["triton_python_backend_utils"] before importing model.py); what reaches the server (BLS calls,
decoupled responses, metrics) goes through `server`, the stub's link to it.

BLS: `InferenceRequest(model_name=..., requested_output_names=[...], inputs=[...]).exec()` runs another
model of the same repository from inside `execute`; `exec(decoupled=True)` iterates a decoupled model's
responses, the last one (flagged final) possibly empty. As in Triton, a model that calls itself needs a free
instance to answer, or the call waits forever.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from . import datatypes

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2

# the config's type names -> numpy, as Triton's module has it (BF16 added: numpy has no bfloat16 of its own)
TRITON_STRING_TO_NUMPY = {mc.DataType.Name(d.enum): d.dtype.type for d in datatypes.DATATYPES}
TRITON_STRING_TO_NUMPY["TYPE_BOOL"] = bool


class TritonModelException(Exception):
    """Raised by this module (and by models) for a failure; from `execute` it fails that execution's requests."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self._msg = msg

    def message(self) -> str:
        return self._msg


class TritonError:
    """An error carried by one InferenceResponse: it fails that request only."""

    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, msg: str, code: int = INTERNAL) -> None:
        self._msg = msg
        self._code = code

    def __str__(self) -> str:
        return self._msg

    def message(self) -> str:
        return self._msg

    def code(self) -> int:
        return self._code


class Tensor:
    """A named numpy array (BYTES tensors are object arrays of bytes)."""

    def __init__(self, name: str, numpy_array: np.ndarray, triton_dtype: int | None = None) -> None:
        array = np.asarray(numpy_array)
        if array.dtype.kind == "U" or array.dtype == np.void:
            raise TritonModelException(
                f"tensor {name!r}: numpy dtype {array.dtype} is not supported; use np.object_ for strings"
            )
        if triton_dtype is not None:
            array = array.view(triton_to_numpy_type(triton_dtype))
        self._name = name
        self._array = array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def triton_dtype(self) -> int | None:
        return numpy_to_triton_type(self._array.dtype)

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def is_cpu(self) -> bool:
        return True

    def to_dlpack(self) -> Any:
        import torch.utils.dlpack  # only models that ask for DLPack pay torch's import

        return torch.utils.dlpack.to_dlpack(torch.from_numpy(self._array))

    @staticmethod
    def from_dlpack(name: str, capsule: Any) -> Tensor:
        import torch.utils.dlpack

        return Tensor(name, torch.utils.dlpack.from_dlpack(capsule).cpu().numpy())


class InferenceResponse:
    def __init__(self, output_tensors: Sequence[Tensor], error: TritonError | None = None) -> None:
        if not isinstance(output_tensors, list):
            raise TritonModelException('"output_tensors" must be a list')
        self._outputs = output_tensors
        self._error = error

    def output_tensors(self) -> list[Tensor]:
        return list(self._outputs)

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


class ServerLink(Protocol):
    """What the stub gives this module: the way to the server."""

    def bls(self, request: InferenceRequest, decoupled: bool) -> Iterator[InferenceResponse]: ...

    def send_response(self, request_key: int, response: InferenceResponse | None, final: bool) -> None: ...

    def cancelled(self, request_key: int) -> bool: ...


server: ServerLink | None = None  # set by the stub before model.py is imported


def _server() -> ServerLink:
    if server is None:
        raise TritonModelException("this needs the server: call it from a model the server runs")
    return server


class InferenceResponseSender:
    """A decoupled model's way to answer: any number of responses, from any thread, until the final flag."""

    def __init__(self, request_key: int) -> None:
        self._key = request_key
        self._closed = False

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        if self._closed:
            raise TritonModelException("Unable to send response. Response sender has been closed.")
        final = bool(flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        if response is None and not final:
            raise TritonModelException(
                "Inference Response object must be provided when the response flags is not "
                "TRITONSERVER_RESPONSE_COMPLETE_FINAL."
            )
        if response is not None and not isinstance(response, InferenceResponse):
            raise TritonModelException(f"send() takes an InferenceResponse, not {type(response).__name__}")
        self._closed = final
        _server().send_response(self._key, response, final)

    def is_cancelled(self) -> bool:
        return _server().cancelled(self._key)


class InferenceRequest:
    """A request given to `execute`, or (built by a model) a BLS request to another model."""

    def __init__(
        self,
        model_name: str = "",
        requested_output_names: Sequence[str] = (),
        inputs: Sequence[Tensor] = (),
        request_id: str = "",
        correlation_id: int | str = 0,
        flags: int = 0,
        timeout: int = 0,
        model_version: int = -1,
        parameters: dict | str | None = None,
        _key: int | None = None,  # set by the stub on the requests it gives `execute`
        **_: Any,  # preferred_memory, trace: the server places tensors itself
    ) -> None:
        # Triton's stub takes names as std::string, so bytes work too: the `bls` example passes
        # `input.as_numpy()[0]`, a numpy bytes object
        self._model_name = _text(model_name)
        self._model_version = model_version
        self._outputs = [_text(name) for name in requested_output_names]
        self._inputs = list(inputs)
        self._request_id = request_id
        self._correlation_id = correlation_id
        self._flags = flags
        self._timeout = timeout
        self._parameters = parameters if isinstance(parameters, str) else json.dumps(parameters or {})
        self._key = _key
        self._sender: InferenceResponseSender | None = None

    def inputs(self) -> list[Tensor]:
        return list(self._inputs)

    def requested_output_names(self) -> list[str]:
        return list(self._outputs)

    def request_id(self) -> str:
        return self._request_id

    def correlation_id(self) -> int | str:
        return self._correlation_id

    def flags(self) -> int:
        return self._flags

    def timeout(self) -> int:
        return self._timeout

    def model_name(self) -> str:
        return self._model_name

    def parameters(self) -> str:
        """The request's parameters as a JSON string (as Triton gives them)."""
        return self._parameters

    def is_cancelled(self) -> bool:
        return self._key is not None and _server().cancelled(self._key)

    def get_response_sender(self) -> InferenceResponseSender:
        """A decoupled model's sender for this request (one per request, as in Triton)."""
        if self._key is None:
            raise TritonModelException("only a request given to execute() has a response sender")
        if self._sender is None:
            self._sender = InferenceResponseSender(self._key)
        return self._sender

    # --- BLS ----------------------------------------------------------------------------------------

    def exec(self, decoupled: bool = False) -> InferenceResponse | Iterator[InferenceResponse]:
        """Run this request on another model; errors come back in the response, as in Triton. With
        `decoupled`, an iterator of that model's responses."""
        responses = _server().bls(self, decoupled)
        if decoupled:
            return responses
        return next(iter(responses))

    async def async_exec(self, decoupled: bool = False) -> InferenceResponse | Iterator[InferenceResponse]:
        """BLS from an `async def execute`: awaits the other model without blocking this model's loop. With
        `decoupled`, as in Triton, an iterator of its responses (they keep arriving while it is read)."""
        if not decoupled:
            return await asyncio.to_thread(self.exec)
        return _server().bls(self, True)


def _text(name: str | bytes) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)  # (numpy's bytes_ is a bytes)


def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    return next((t for t in inference_request.inputs() if t.name() == name), None)


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    return next((t for t in inference_response.output_tensors() if t.name() == name), None)


def using_decoupled_model_transaction_policy(model_config: dict) -> bool:
    return bool(model_config.get("model_transaction_policy", {}).get("decoupled", False))


def get_input_config_by_name(model_config: dict, name: str) -> dict | None:
    return next((t for t in model_config.get("input", []) if t["name"] == name), None)


def get_output_config_by_name(model_config: dict, name: str) -> dict | None:
    return next((t for t in model_config.get("output", []) if t["name"] == name), None)


def triton_string_to_numpy(triton_type_string: str) -> type:
    """"TYPE_FP32" -> np.float32."""
    return TRITON_STRING_TO_NUMPY[triton_type_string]


def triton_to_numpy_type(data_type: int) -> type:
    """Triton's data type number (as in the config enum: 11 = FP32) -> numpy type."""
    return datatypes.BY_ENUM[data_type].dtype.type


def numpy_to_triton_type(data_type: Any) -> int | None:
    dtype = np.dtype(data_type)
    if dtype.kind in "OS":
        return mc.TYPE_STRING
    found = datatypes.BY_DTYPE.get(dtype)
    return found.enum if found else None


class Logger:
    """pb_utils.Logger: Python models log through deskpod's logging."""

    _log = logging.getLogger("deskpod.backends.python.model")

    @classmethod
    def log(cls, message: str, level: int = logging.INFO) -> None:
        cls._log.log(level, message)

    @classmethod
    def log_info(cls, message: str) -> None:
        cls._log.info(message)

    @classmethod
    def log_warn(cls, message: str) -> None:
        cls._log.warning(message)

    @classmethod
    def log_error(cls, message: str) -> None:
        cls._log.error(message)

    @classmethod
    def log_verbose(cls, message: str) -> None:
        cls._log.debug(message)


from deskpod.backends.custom_metrics import MetricFamily  # noqa: E402 - pb_utils.MetricFamily (Triton's custom metrics)

