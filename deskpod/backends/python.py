"""The Python backend: `model.py` with class TritonPythonModel (initialize / execute / finalize), each instance in
its own process (python_stub, Triton's stub design), its tensors through shared memory (stub_channel).

Nothing of model.py runs in the server, so a model that segfaults, hangs or calls exit() cannot take the other
models down. A process that dies fails the requests it held (naming the signal) and is started again; a model
whose new process cannot initialize is UNAVAILABLE with that reason. `execute` receives a list of requests (the
dynamic batcher's batch, never concatenated) and answers one response per request, or, when the model is
decoupled, any number of responses per request through its response sender, the last flagged final.

Settings (Triton's `--backend-config python,KEY=VALUE`): stub-timeout-seconds (default 30) bounds starting a
process and its initialize; execute-timeout-seconds (default: none, as in Triton) bounds one execute, after which
the process is killed and started again; memory-limit-mb (default: none) caps each process's heap, a model that
runs out of it (a leak) failing that execution and being started again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc

from deskpod.errors import BackendError, CorruptModel, DeskpodError, InvalidRequest

from . import custom_metrics
from .base import Execution, ModelContext, Pending, Result
from .python_utils import TritonError
from .config import config_to_json
from .stub_channel import Channel, ChannelClosed, make_arena
from .types import InferRequest

log = logging.getLogger(__name__)

SETTINGS = {"stub-timeout-seconds": 30.0, "execute-timeout-seconds": 0.0, "memory-limit-mb": 0.0}  # 0: no limit


class StubDied(BackendError):
    """The model's process ended while it owed answers."""


class StubTimeout(BackendError):
    """The model's process did not answer in time."""


def settings(backend_config: Mapping[str, str]) -> dict[str, float]:
    unknown = set(backend_config) - set(SETTINGS)
    if unknown:
        raise CorruptModel(f"--backend-config python: unknown setting(s) {', '.join(sorted(unknown))}; "
                           f"known: {', '.join(SETTINGS)}")
    values = {}
    for key, default in SETTINGS.items():
        try:
            values[key] = float(backend_config.get(key, default))
        except ValueError:
            raise CorruptModel(f"--backend-config python,{key}: {backend_config[key]!r} is not a number") from None
        if values[key] < 0:
            raise CorruptModel(f"--backend-config python,{key}: must be 0 or more (0: no limit), got {values[key]:g}")
    return values


class StubProcess:
    """One running model process: its channel, and a reader thread that routes what it sends — answers to the
    call waiting for them, anything else to `on_message`. `on_exit(self, reason)` runs once when it ends."""

    def __init__(self, label: str, on_message: Callable[[dict, list[np.ndarray]], None],
                 on_exit: Callable[[StubProcess, str], None], memory_limit_mb: int = 0) -> None:
        self.label = label
        self.on_message, self.on_exit = on_message, on_exit
        ours, theirs = socket.socketpair()
        to_stub, from_stub = make_arena(), make_arena()
        fds = (theirs.fileno(), to_stub, from_stub)
        self.process = subprocess.Popen(
            # the stub's own arena is the one we read, and the other way round
            [sys.executable, "-m", "deskpod.backends.python_stub", str(theirs.fileno()), str(from_stub), str(to_stub),
             str(memory_limit_mb)],
            pass_fds=fds, stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C meant for the server is not the model's; the server stops it
        )
        theirs.close()
        self.channel = Channel(ours, send_arena_fd=to_stub, receive_arena_fd=from_stub)
        for fd in (to_stub, from_stub):
            os.close(fd)  # both are mapped now
        self._waiting: dict[int, Callable[[Any], Any]] = {}  # call id -> where its answer (or failure) goes
        self._ids = itertools.count(1)
        self.exit_reason: str | None = None
        self.ended = threading.Event()  # set once on_exit has run
        threading.Thread(target=self._read, name=f"{label}-reader", daemon=True).start()

    def call(self, op: str, header: dict, arrays: Sequence[np.ndarray] = (), timeout: float | None = None,
             ) -> tuple[dict, list[np.ndarray]]:
        """Send one message and wait for its answer; StubDied / StubTimeout when none comes."""
        answer: concurrent.futures.Future = concurrent.futures.Future()
        call_id = self._ask(op, header, arrays, lambda outcome: answer.done() or _settle(answer, outcome))
        try:
            return answer.result(timeout or None)
        except concurrent.futures.TimeoutError:
            raise StubTimeout(f"it did not answer {op} within {timeout:g} s") from None
        finally:
            self._waiting.pop(call_id, None)

    async def call_async(self, op: str, header: dict, arrays: Sequence[np.ndarray] = (),
                         timeout: float | None = None) -> tuple[dict, list[np.ndarray]]:
        """`call` for the event loop: it waits without holding a thread."""
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        call_id = self._ask(op, header, arrays,
                            lambda outcome: loop.call_soon_threadsafe(lambda: answer.done() or _settle(answer, outcome)))
        try:
            return await asyncio.wait_for(answer, timeout or None)
        except TimeoutError:
            raise StubTimeout(f"it did not answer {op} within {timeout:g} s") from None
        finally:
            self._waiting.pop(call_id, None)

    def _ask(self, op: str, header: dict, arrays: Sequence[np.ndarray], deliver: Callable[[Any], Any]) -> int:
        call_id = next(self._ids)
        self._waiting[call_id] = deliver
        if self.exit_reason is not None:
            self._waiting.pop(call_id, None)
            deliver(StubDied(self.exit_reason))
        else:
            try:
                self.channel.send({"op": op, "id": call_id, **header}, arrays)
            except ChannelClosed:
                pass  # the reader sees the end and fails the call with the reason
        return call_id

    def send(self, header: dict, arrays: Sequence[np.ndarray] = ()) -> None:
        try:
            self.channel.send(header, arrays)
        except ChannelClosed:
            pass  # it has gone; the reader reports why

    def _read(self) -> None:
        try:
            while True:
                header, arrays = self.channel.receive()
                if header["op"] == "reply":
                    deliver = self._waiting.pop(header["id"], None)
                    if deliver is not None:
                        deliver((header, arrays))
                else:
                    self.on_message(header, arrays)
        except ChannelClosed:
            pass
        except Exception:  # noqa: BLE001 - a garbled message: the process is not to be trusted further
            log.exception("%s: reading from the model's process failed; stopping it", self.label)
            self.process.kill()
        self.exit_reason = self._why_ended()
        self.channel.close()
        self.on_exit(self, self.exit_reason)  # before the waiting calls fail: a retry finds the restart under way
        self.ended.set()
        for call_id in list(self._waiting):
            deliver = self._waiting.pop(call_id, None)
            if deliver is not None:
                deliver(StubDied(self.exit_reason))

    def _why_ended(self) -> str:
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # it closed the channel yet runs on
            self.process.kill()
            code = self.process.wait()
        if code < 0:
            return f"its process was killed by {signal.Signals(-code).name}"
        return f"its process exited with status {code}"

    def stop(self, timeout: float) -> None:
        """finalize, then the process ends; killed if it takes longer than `timeout`."""
        try:
            if self.exit_reason is None:
                self.call("finalize", {}, timeout=timeout)
        except BackendError as e:
            log.warning("%s: finalize: %s", self.label, e)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


class PythonInstance:
    """The server's side of one instance: requests out to the model's process, responses back."""

    def __init__(self, config: mc.ModelConfig, path: Path, context: ModelContext) -> None:
        self.config, self.path, self.context = config, path, context
        self.settings = settings(context.backend_config)
        self.decoupled = config.model_transaction_policy.decoupled
        self._keys = itertools.count(1)
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, Pending]] = {}  # open decoupled requests
        self._restart: threading.Thread | None = None
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the server's, where BLS calls run
        self.stub = self._start()

    # --- the process ---------------------------------------------------------------------------------

    def _start(self) -> StubProcess:
        stub = StubProcess(self.context.instance_name, self._on_message, self._on_exit,
                           int(self.settings["memory-limit-mb"]))
        args = {
            "model_config": config_to_json(self.config),
            "model_instance_kind": "CPU",
            "model_instance_name": self.context.instance_name,
            "model_instance_device_id": "0",
            "model_repository": str(self.context.repository / self.config.name),
            "model_version": self.context.version,
            "model_name": self.config.name,
        }
        try:
            answer, _ = stub.call("initialize", {"path": str(self.path), "args": args},
                                  timeout=self.settings["stub-timeout-seconds"])
        except BackendError as e:
            stub.kill()
            raise CorruptModel(f"{self.path}: loading failed: {e}") from None
        if "error" in answer:
            stub.kill()
            raise CorruptModel(answer["error"])
        return stub

    def _on_exit(self, stub: StubProcess, reason: str) -> None:
        """The serving process ended: fail the decoupled requests still open and start a new one (unless
        closing). One that never finished starting is the loader's to report."""
        if stub is not getattr(self, "stub", None):
            return
        for loop, pending in list(self._streams.values()):
            self._deliver(loop, pending, StubDied(f"model {self.config.name!r} failed: {reason}"), True)
        self._streams.clear()
        if not self._closing:
            log.warning("model %s (%s): %s; starting it again", self.config.name, self.context.instance_name, reason)
            self._restart = threading.Thread(target=self._start_again, args=(reason,), daemon=True)
            self._restart.start()

    def _start_again(self, reason: str) -> None:
        try:
            self.stub = self._start()
        except DeskpodError as e:
            self.context.unavailable(f"{reason}, and starting it again failed: {e}")

    # --- executing -----------------------------------------------------------------------------------

    async def execute(self, batch: Sequence[Pending], execution: Execution) -> list[Result]:
        """On the server's loop (the batcher awaits it): the work is the model process's, nothing here blocks."""
        if self.stub.exit_reason is not None:  # it has just ended: wait until its successor is under way
            await asyncio.to_thread(self.stub.ended.wait, self.settings["stub-timeout-seconds"] or None)
        restart = self._restart
        if restart is not None:  # a process that died is being started again: this batch waits for it
            await asyncio.to_thread(restart.join)
            if self._restart is restart:
                self._restart = None
        self._loop = execution.loop
        stub = self.stub
        if stub.exit_reason is not None:
            raise StubDied(f"model {self.config.name!r} is not running: {stub.exit_reason}")
        specs, arrays = self._encode(batch, execution)
        execution.lap("compute_input")
        timeout = self.settings["execute-timeout-seconds"]
        try:
            answer, outputs = await stub.call_async("execute", {"decoupled": self.decoupled, "requests": specs},
                                                    arrays, timeout)
        except StubTimeout as e:
            stub.kill()  # the reader sees it end and starts a new one
            raise StubTimeout(f"model {self.config.name!r}: {e}; its process was stopped and is started again") from None
        except StubDied as e:
            raise StubDied(f"model {self.config.name!r} failed: {e}; it is started again") from None
        execution.lap("compute_infer")
        if answer.get("exiting"):  # it ends itself (out of memory): the next batch waits for its successor
            await asyncio.to_thread(stub.ended.wait, self.settings["stub-timeout-seconds"])
        if "failed" in answer:
            self._end_streams(specs)
            raise BackendError(f"model {self.config.name!r} failed: {answer['failed']}")
        results = [self._result(r, outputs) for r in answer["results"]]
        execution.lap("compute_output")
        return results

    def _encode(self, batch: Sequence[Pending], execution: Execution) -> tuple[list[dict], list[np.ndarray]]:
        specs, arrays = [], []
        for pending in batch:
            request = pending.request
            parameters = dict(request.parameters)
            correlation_id, flags = parameters.pop("_sequence", (0, 0))  # set by the sequence batcher
            key = next(self._keys)
            if self.decoupled:
                self._streams[key] = (execution.loop, pending)
            inputs = []
            for name, value in pending.inputs.items():
                inputs.append([name, len(arrays)])
                arrays.append(value)
            specs.append({
                "key": key, "model_name": request.model, "request_id": request.id, "outputs": list(pending.outputs),
                "inputs": inputs, "correlation_id": correlation_id, "flags": flags,
                "parameters": json_safe(parameters),
            })
        return specs, arrays

    def _end_streams(self, specs: list[dict]) -> None:
        for spec in specs:
            self._streams.pop(spec["key"], None)

    def _result(self, result: dict | None, arrays: list[np.ndarray]) -> Result:
        if result is None:
            return None  # a decoupled request: its responses come through its sink
        if "error" in result:
            kind = InvalidRequest if result["code"] == TritonError.INVALID_ARG else BackendError  # the client's to fix
            return kind(f"model {self.config.name!r}: {result['error']}")
        return {name: arrays[index] for name, index in result["outputs"]}

    # --- what the process sends unasked --------------------------------------------------------------

    def _on_message(self, header: dict, arrays: list[np.ndarray]) -> None:
        op = header["op"]
        if op == "response":
            self._on_response(header, arrays)
        elif op == "bls":
            self._on_bls(header, arrays)
        elif op == "metric":
            custom_metrics.apply(header)
        else:
            log.warning("%s: unknown message %r from the model's process", self.context.instance_name, op)

    def _on_response(self, header: dict, arrays: list[np.ndarray]) -> None:
        key, final = header["key"], header["final"]
        entry = self._streams.pop(key, None) if final else self._streams.get(key)
        if entry is None:
            return  # the request was cancelled, or its process already failed it
        loop, pending = entry
        result = header["result"]
        self._deliver(loop, pending, None if result is None else self._result(result, arrays), final)

    @staticmethod
    def _deliver(loop: asyncio.AbstractEventLoop, pending: Pending, result: Result, final: bool) -> None:
        if pending.sink is not None and not loop.is_closed():
            loop.call_soon_threadsafe(pending.sink, result, final)

    def cancel(self, pending: Pending) -> None:
        """The client of a decoupled request left: the model sees is_cancelled() and its sends are dropped."""
        for key, (_, open_pending) in list(self._streams.items()):
            if open_pending is pending:
                self._streams.pop(key, None)
                self.stub.send({"op": "cancel", "key": key})

    def _on_bls(self, header: dict, arrays: list[np.ndarray]) -> None:
        """A BLS call: run on the server's loop; every answer goes back to the model's waiting thread."""
        loop, infer_stream = self._loop, self.context.infer_stream
        stub, call = self.stub, header["call"]
        request = InferRequest(
            model=header["model"], version=header["version"], id=header["request_id"],
            inputs=dict(zip(header["inputs"], arrays)), outputs=tuple(header["outputs"]) or None,
            parameters=header["parameters"],
        )

        async def run() -> None:
            try:
                if header["decoupled"]:
                    async for response in infer_stream(request):
                        _answer(stub, call, response.outputs, response.final)
                else:
                    response = await self.context.infer(request)
                    _answer(stub, call, response.outputs, True)
            except Exception as e:  # noqa: BLE001 - BLS reports errors in the response, as Triton does
                stub.send({"op": "bls_response", "call": call, "final": True, "error": str(e)})

        if loop is None:
            stub.send({"op": "bls_response", "call": call, "final": True,
                       "error": "BLS requests can be made from execute (or a response sender's thread) only"})
        else:
            asyncio.run_coroutine_threadsafe(run(), loop)

    def close(self) -> None:
        self._closing = True
        if self._restart is not None:
            self._restart.join()
        self.stub.stop(self.settings["stub-timeout-seconds"])


def _settle(future: Any, outcome: Any) -> None:
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _answer(stub: StubProcess, call: int, outputs: Mapping[str, np.ndarray], final: bool) -> None:
    names = list(outputs)
    stub.send({"op": "bls_response", "call": call, "final": final, "outputs": [[n, i] for i, n in enumerate(names)]},
              [outputs[n] for n in names])


def json_safe(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Request parameters as JSON (what pb_utils' `parameters()` gives): numpy scalars become numbers."""
    return {key: value.item() if isinstance(value, np.generic) else value for key, value in parameters.items()}


def complete_config(config: mc.ModelConfig, fields: set[str], path: Path, backend_config: Mapping[str, str]) -> None:
    """Run the model's own auto_complete_config, when it defines one (Triton does, before loading), in a
    process of its own like everything else of model.py."""
    timeout = settings(backend_config)["stub-timeout-seconds"]
    stub = StubProcess(f"{config.name}-auto-complete", lambda header, arrays: None, lambda stub, reason: None)
    try:
        answer, _ = stub.call("auto_complete", {"path": str(path), "config": json_format.MessageToJson(config)},
                              timeout=timeout)
    except BackendError as e:
        raise CorruptModel(f"{path}: auto_complete_config failed: {e}") from None
    finally:
        stub.stop(timeout)
    if "error" in answer:
        raise CorruptModel(answer["error"])
    config.Clear()
    json_format.Parse(answer["config"], config)


def create_instance(config: mc.ModelConfig, path: Path, context: ModelContext) -> PythonInstance:
    return PythonInstance(config, path, context)
