"""The Python backend: `model.py` with class TritonPythonModel (initialize / execute / finalize), run
in-process, one object per instance, each executing on its own worker thread.

model.py is imported from its file under a unique module name (so two models, or two instances, never share
module state), after `triton_python_backend_utils` is installed in sys.modules. `execute` receives a list of
requests (the dynamic batcher's batch, never concatenated) and returns one response per request: a response
carrying a TritonError fails its request only; an exception fails that execution's requests only.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import itertools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from deskpod.errors import BackendError, CorruptModel, InvalidRequest

from . import datatypes
from . import python_utils as pb_utils
from .base import Execution, ModelContext, Pending, Result
from .config import config_to_dict, config_to_json

_serial = itertools.count()


def import_model(path: Path, name: str) -> ModuleType:
    """Import model.py under a unique module name; its folder is importable while it loads (as in Triton)."""
    module_name = f"deskpod_python_model_{name}_{next(_serial)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise CorruptModel(f"{path}: not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    # model.py does `import triton_python_backend_utils as pb_utils`: it gets ours, whatever else is installed
    sys.modules["triton_python_backend_utils"] = pb_utils
    sys.modules[module_name] = module
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # a model calling exit() must not stop the server
        del sys.modules[module_name]
        raise CorruptModel(f"{path}: importing it failed: {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(str(path.parent))
    if not inspect.isclass(getattr(module, "TritonPythonModel", None)):
        del sys.modules[module_name]
        raise CorruptModel(f"{path}: defines no class TritonPythonModel")
    return module


class AutoCompleteConfig:
    """What Triton passes to TritonPythonModel.auto_complete_config: the config as a dict, editable."""

    def __init__(self, config: mc.ModelConfig) -> None:
        self._config = config

    def as_dict(self) -> dict:
        return config_to_dict(self._config)

    def set_max_batch_size(self, max_batch_size: int) -> None:
        self._config.max_batch_size = max_batch_size

    def set_dynamic_batching(self) -> None:
        self._config.dynamic_batching.SetInParent()

    def add_input(self, spec: dict) -> None:
        self._add(self._config.input, spec, "input")

    def add_output(self, spec: dict) -> None:
        self._add(self._config.output, spec, "output")

    def set_model_transaction_policy(self, policy: dict) -> None:
        if policy.get("decoupled"):
            raise pb_utils.TritonModelException("decoupled models are not supported by deskpod")

    @staticmethod
    def _add(tensors: Any, spec: dict, kind: str) -> None:
        if any(t.name == spec["name"] for t in tensors):
            return  # what config.pbtxt declares wins, as in Triton
        tensors.add(name=spec["name"], data_type=mc.DataType.Value(spec["data_type"]), dims=spec["dims"])


def complete_config(config: mc.ModelConfig, fields: set[str], path: Path) -> None:
    """Run the model's own auto_complete_config, when it defines one (Triton does, before loading)."""
    module = import_model(path, config.name)
    try:
        complete = getattr(module.TritonPythonModel, "auto_complete_config", None)
        if complete is not None:
            try:
                complete(AutoCompleteConfig(config))
            except Exception as e:
                raise CorruptModel(f"{path}: auto_complete_config failed: {type(e).__name__}: {e}") from e
    finally:
        sys.modules.pop(module.__name__, None)


class PythonInstance:
    def __init__(self, config: mc.ModelConfig, path: Path, context: ModelContext) -> None:
        self.config = config
        self.context = context
        self.module = import_model(path, config.name)
        self.model = self.module.TritonPythonModel()
        args = {
            "model_config": config_to_json(config),
            "model_instance_kind": "CPU",
            "model_instance_name": context.instance_name,
            "model_instance_device_id": "0",
            "model_repository": str(context.repository / config.name),
            "model_version": context.version,
            "model_name": config.name,
        }
        if hasattr(self.model, "initialize"):
            try:
                self.model.initialize(args)
            except (Exception, SystemExit) as e:
                sys.modules.pop(self.module.__name__, None)
                raise CorruptModel(f"{path}: initialize failed: {type(e).__name__}: {e}") from e

    def execute(self, batch: Sequence[Pending], execution: Execution) -> list[Result]:
        requests = [_request(p) for p in batch]
        execution.lap("compute_input")
        pb_utils.bls_context.infer, pb_utils.bls_context.loop = self.context.infer, execution.loop
        try:
            responses = self.model.execute(requests)
            if inspect.iscoroutine(responses):  # `async def execute`, as Triton allows
                responses = asyncio.run(responses)
        finally:
            pb_utils.bls_context.infer = pb_utils.bls_context.loop = None
        execution.lap("compute_infer")
        if not isinstance(responses, list | tuple) or len(responses) != len(batch):
            got = len(responses) if isinstance(responses, list | tuple) else type(responses).__name__
            raise BackendError(
                f"model {self.config.name!r}: execute returned {got} for {len(batch)} requests; "
                f"it must return a list with one InferenceResponse per request"
            )
        results = [self._result(response) for response in responses]
        execution.lap("compute_output")
        return results

    def _result(self, response: Any) -> Result:
        if not isinstance(response, pb_utils.InferenceResponse):
            return BackendError(
                f"model {self.config.name!r}: execute returned {type(response).__name__} where an "
                f"InferenceResponse belongs"
            )
        error = response.error()
        if error is not None:
            kind = InvalidRequest if error.code() == pb_utils.TritonError.INVALID_ARG else BackendError
            return kind(f"model {self.config.name!r}: {error.message()}")
        return {t.name(): _canonical(t.as_numpy()) for t in response.output_tensors()}

    def close(self) -> None:
        try:
            if hasattr(self.model, "finalize"):
                self.model.finalize()
        finally:
            sys.modules.pop(self.module.__name__, None)


def _request(pending: Pending) -> pb_utils.InferenceRequest:
    request = pending.request
    parameters = dict(request.parameters)
    correlation_id, flags = parameters.pop("_sequence", (0, 0))  # set by the sequence batcher
    return pb_utils.InferenceRequest(
        model_name=request.model,
        requested_output_names=list(pending.outputs),
        inputs=[pb_utils.Tensor(name, value) for name, value in pending.inputs.items()],
        request_id=request.id,
        correlation_id=correlation_id,
        flags=flags,
        parameters=json.dumps(parameters),
    )


def _canonical(value: Any) -> Any:
    array = value if hasattr(value, "dtype") else None
    if array is not None and array.dtype.kind in "OSU":
        return datatypes.as_bytes_array(array)
    return value


def create_instance(config: mc.ModelConfig, path: Path, context: ModelContext) -> PythonInstance:
    return PythonInstance(config, path, context)
