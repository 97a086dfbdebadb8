"""`triton_python_backend_utils` for Python models run in-process: the names Triton's Python backend gives
model.py (Tensor, InferenceRequest, InferenceResponse, TritonError, get_input_tensor_by_name, ...), so an
existing Triton Python model runs unchanged. python.py installs this module as
sys.modules["triton_python_backend_utils"] before importing any model.py.

BLS: `InferenceRequest(model_name=..., requested_output_names=[...], inputs=[...]).exec()` runs another
model of the same repository from inside `execute`, through the repository's `infer` on the server's loop.
As in Triton, a model that calls itself needs a free instance to answer, or the call waits forever.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from . import datatypes
from .types import InferRequest as _InferRequest

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


class _Context(threading.local):
    """Set by the Python backend around `execute` on the instance's thread: how BLS reaches the repository."""

    infer: Callable[[_InferRequest], Awaitable[Any]] | None = None
    loop: asyncio.AbstractEventLoop | None = None


bls_context = _Context()


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
        **_: Any,  # preferred_memory, trace: meaningless in-process
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
        return False

    def get_response_sender(self) -> Any:
        raise TritonModelException("decoupled models (response senders) are not supported by deskpod")

    # --- BLS ----------------------------------------------------------------------------------------

    def exec(self, decoupled: bool = False) -> InferenceResponse:
        """Run this request on another model; errors come back in the response, as in Triton."""
        if decoupled:
            raise TritonModelException("decoupled BLS calls are not supported by deskpod")
        infer, loop = bls_context.infer, bls_context.loop
        if infer is None or loop is None:
            raise TritonModelException("BLS requests can be executed only from within execute()")
        future = asyncio.run_coroutine_threadsafe(self._run(infer), loop)
        return future.result()

    async def async_exec(self, decoupled: bool = False) -> InferenceResponse:
        """BLS from an `async def execute`: awaits the other model without blocking this model's loop."""
        if decoupled:
            raise TritonModelException("decoupled BLS calls are not supported by deskpod")
        infer, loop = bls_context.infer, bls_context.loop
        if infer is None or loop is None:
            raise TritonModelException("BLS requests can be executed only from within execute()")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._run(infer), loop))

    async def _run(self, infer: Callable[[_InferRequest], Awaitable[Any]]) -> InferenceResponse:
        request = _InferRequest(
            model=self._model_name,
            version=str(self._model_version) if self._model_version > 0 else "",
            id=self._request_id,
            inputs={t.name(): t.as_numpy() for t in self._inputs},
            outputs=tuple(self._outputs) or None,
            parameters=json.loads(self._parameters),
        )
        try:
            response = await infer(request)
        except Exception as e:  # noqa: BLE001 - BLS reports errors in the response, as Triton does
            return InferenceResponse([], TritonError(str(e)))
        return InferenceResponse([Tensor(n, v) for n, v in response.outputs.items()])


def _text(name: str | bytes) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)  # (numpy's bytes_ is a bytes)


def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    return next((t for t in inference_request.inputs() if t.name() == name), None)


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    return next((t for t in inference_response.output_tensors() if t.name() == name), None)


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

