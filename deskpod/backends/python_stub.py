"""A Python model's own process (Triton's stub):
`python -m deskpod.backends.python_stub SOCKET_FD OUT_FD IN_FD MEMORY_LIMIT_MB` (0: no limit).

The server starts one per model instance and talks to it over a stub_channel. The process imports model.py
(after installing triton_python_backend_utils), runs auto_complete_config / initialize / execute / finalize
on its main thread, one message at a time, and answers each. What the model asks of the server goes the other
way on the same channel: BLS calls (their answers come back to the thread that waits for them), a decoupled
model's responses (from any thread, at any time), its metrics. A model that segfaults, hangs or leaks takes
only this process down; the server sees the channel close and says why.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import itertools
import json
import logging
import os
import queue
import resource
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc

from . import custom_metrics
from . import python_utils as pb_utils
from .config import config_to_dict
from .stub_channel import Channel, ChannelClosed

log = logging.getLogger("deskpod.backends.python.model")


def import_model(path: Path) -> ModuleType:
    """Import model.py; its folder is importable while it loads (as in Triton). Errors name the file."""
    spec = importlib.util.spec_from_file_location("model", path)
    if spec is None or spec.loader is None:
        raise ModelFailure(f"{path}: not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    # model.py does `import triton_python_backend_utils as pb_utils`: it gets ours, whatever else is installed
    sys.modules["triton_python_backend_utils"] = pb_utils
    sys.modules["model"] = module
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # a model calling exit() is reported, like any failure
        raise ModelFailure(f"{path}: importing it failed: {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(str(path.parent))
    if not inspect.isclass(getattr(module, "TritonPythonModel", None)):
        raise ModelFailure(f"{path}: defines no class TritonPythonModel")
    return module


class ModelFailure(Exception):
    """The model's own code failed where the server cannot go on with it (import, initialize)."""


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
        self._add(self._config.input, spec)

    def add_output(self, spec: dict) -> None:
        self._add(self._config.output, spec)

    def set_model_transaction_policy(self, policy: dict) -> None:
        self._config.model_transaction_policy.decoupled = bool(policy.get("decoupled", False))

    @staticmethod
    def _add(tensors: Any, spec: dict) -> None:
        if any(t.name == spec["name"] for t in tensors):
            return  # what config.pbtxt declares wins, as in Triton
        tensors.add(name=spec["name"], data_type=mc.DataType.Value(spec["data_type"]), dims=spec["dims"])


class Stub:
    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.work: queue.Queue[tuple[dict, list[np.ndarray]] | None] = queue.Queue()
        self.model: Any = None
        self._calls: dict[int, queue.Queue] = {}  # BLS call id -> where its answers go
        self._call_ids = itertools.count(1)
        self._cancelled: set[int] = set()
        self.exhausted = False  # the model ran out of memory: end this process once the failure is sent
        pb_utils.server = self
        custom_metrics.forward = self._forward_metric

    # --- the main thread: one message at a time -----------------------------------------------------

    def run(self) -> None:
        threading.Thread(target=self._read, name="stub-reader", daemon=True).start()
        while (item := self.work.get()) is not None:
            header, arrays = item
            op = header["op"]
            try:
                reply, out = getattr(self, f"_on_{op}")(header, arrays)
            except ModelFailure as e:
                reply, out = {"error": str(e)}, []
            self.channel.send({"op": "reply", "id": header["id"], **reply}, out)
            if op == "finalize":
                return
            if self.exhausted:
                os._exit(0)  # the memory a leak holds is freed only with the process

    def _read(self) -> None:
        """The reader thread: answers to BLS calls go to their callers, the rest to the main thread."""
        try:
            while True:
                header, arrays = self.channel.receive()
                if header["op"] == "bls_response":
                    answers = self._calls.get(header["call"])
                    if answers is not None:  # (a caller that stopped reading its responses has left)
                        answers.put((header, arrays))
                elif header["op"] == "cancel":
                    self._cancelled.add(header["key"])
                else:
                    self.work.put((header, arrays))
        except ChannelClosed:
            os._exit(0)  # the server has gone: nothing is left to answer

    def _on_auto_complete(self, header: dict, arrays: list) -> tuple[dict, list]:
        config = json_format.Parse(header["config"], mc.ModelConfig())
        module = import_model(Path(header["path"]))
        complete = getattr(module.TritonPythonModel, "auto_complete_config", None)
        if complete is not None:
            try:
                complete(AutoCompleteConfig(config))
            except Exception as e:
                raise ModelFailure(f"{header['path']}: auto_complete_config failed: {type(e).__name__}: {e}") from e
        return {"config": json_format.MessageToJson(config)}, []

    def _on_initialize(self, header: dict, arrays: list) -> tuple[dict, list]:
        module = import_model(Path(header["path"]))
        self.model = module.TritonPythonModel()
        if hasattr(self.model, "initialize"):
            try:
                self.model.initialize(header["args"])
            except (Exception, SystemExit) as e:
                raise ModelFailure(f"{header['path']}: initialize failed: {type(e).__name__}: {e}") from e
        return {}, []

    def _on_execute(self, header: dict, arrays: list[np.ndarray]) -> tuple[dict, list]:
        requests = [_request(spec, arrays) for spec in header["requests"]]
        try:
            responses = self.model.execute(requests)
            if inspect.iscoroutine(responses):  # `async def execute`, as Triton allows
                responses = asyncio.run(responses)
        except MemoryError:  # over its memory limit: this process ends after answering, a fresh one starts
            self.exhausted = True
            return {"failed": "MemoryError: it ran out of its memory limit (--backend-config "
                              "python,memory-limit-mb); its process is started again", "exiting": True}, []
        except (Exception, SystemExit) as e:  # fails this execution's requests only
            if isinstance(e, SystemExit):
                return {"failed": f"the model's code called exit({e.code})"}, []
            return {"failed": f"{type(e).__name__}: {e}"}, []
        if header["decoupled"]:
            return {"results": [None] * len(requests)}, []  # they answer through their response senders
        if not isinstance(responses, list | tuple) or len(responses) != len(requests):
            got = len(responses) if isinstance(responses, list | tuple) else type(responses).__name__
            return {"failed": f"execute returned {got} for {len(requests)} requests; it must return a list "
                              f"with one InferenceResponse per request"}, []
        out: list[np.ndarray] = []
        return {"results": [_result(response, out) for response in responses]}, out

    def _on_finalize(self, header: dict, arrays: list) -> tuple[dict, list]:
        if self.model is not None and hasattr(self.model, "finalize"):
            try:
                self.model.finalize()
            except Exception as e:  # noqa: BLE001 - reported, and the process ends anyway
                return {"error": f"finalize failed: {type(e).__name__}: {e}"}, []
        return {}, []

    # --- what the model asks of the server (pb_utils.ServerLink) --------------------------------------

    def bls(self, request: pb_utils.InferenceRequest, decoupled: bool) -> Iterator[pb_utils.InferenceResponse]:
        call = next(self._call_ids)
        answers: queue.Queue = queue.Queue()
        self._calls[call] = answers
        inputs = request.inputs()
        self.channel.send(
            {
                "op": "bls", "call": call, "decoupled": decoupled, "model": request.model_name(),
                "version": str(request._model_version) if request._model_version > 0 else "",
                "request_id": request.request_id(), "outputs": request.requested_output_names(),
                "inputs": [t.name() for t in inputs], "parameters": json.loads(request.parameters()),
            },
            [t.as_numpy() for t in inputs],
        )
        return self._answers(call, answers)

    def _answers(self, call: int, answers: queue.Queue) -> Iterator[pb_utils.InferenceResponse]:
        try:
            while True:
                header, arrays = answers.get()
                yield _response(header, arrays)
                if header["final"]:
                    return
        finally:
            del self._calls[call]

    def send_response(self, request_key: int, response: pb_utils.InferenceResponse | None, final: bool) -> None:
        out: list[np.ndarray] = []
        result = _result(response, out) if response is not None else None
        self.channel.send({"op": "response", "key": request_key, "final": final, "result": result}, out)
        if final:
            self._cancelled.discard(request_key)

    def cancelled(self, request_key: int) -> bool:
        return request_key in self._cancelled

    def _forward_metric(self, update: dict) -> None:
        self.channel.send({"op": "metric", **update})


def _request(spec: dict, arrays: list[np.ndarray]) -> pb_utils.InferenceRequest:
    return pb_utils.InferenceRequest(
        model_name=spec["model_name"],
        requested_output_names=spec["outputs"],
        inputs=[pb_utils.Tensor(name, arrays[index]) for name, index in spec["inputs"]],
        request_id=spec["request_id"],
        correlation_id=spec["correlation_id"],
        flags=spec["flags"],
        parameters=spec["parameters"],
        _key=spec["key"],
    )


def _result(response: Any, out: list[np.ndarray]) -> dict:
    """One response as the server reads it: its outputs (their arrays appended to `out`), or its error."""
    if not isinstance(response, pb_utils.InferenceResponse):
        return {"error": f"execute returned {type(response).__name__} where an InferenceResponse belongs",
                "code": pb_utils.TritonError.INTERNAL}
    error = response.error()
    if error is not None:
        return {"error": error.message(), "code": error.code()}
    names = []
    for tensor in response.output_tensors():
        names.append([tensor.name(), len(out)])
        out.append(tensor.as_numpy())
    return {"outputs": names}


def _response(header: dict, arrays: list[np.ndarray]) -> pb_utils.InferenceResponse:
    if "error" in header:
        return pb_utils.InferenceResponse([], pb_utils.TritonError(header["error"]))
    return pb_utils.InferenceResponse([pb_utils.Tensor(name, arrays[i]) for name, i in header["outputs"]])


def limit_memory(megabytes: int) -> None:
    """Cap the process's heap (RLIMIT_DATA: its private memory, not its code or thread stacks): a leak ends in a
    MemoryError here rather than in the machine's OOM killer choosing a victim."""
    limit = megabytes << 20
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def main(argv: list[str]) -> None:
    sock_fd, out_fd, in_fd, memory_limit_mb = (int(a) for a in argv)
    if memory_limit_mb:
        limit_memory(memory_limit_mb)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    channel = Channel(socket.socket(fileno=sock_fd), send_arena_fd=out_fd, receive_arena_fd=in_fd)
    os.close(out_fd)
    os.close(in_fd)
    Stub(channel).run()
    channel.close()


if __name__ == "__main__":
    main(sys.argv[1:])
