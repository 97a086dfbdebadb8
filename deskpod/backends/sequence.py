"""Triton's sequence batcher, for stateful models (a policy that keeps a robot's recurrent state, a tracker):
requests carry a correlation ID (`sequence_id`, a uint64 or a string) and `sequence_start` / `sequence_end`
parameters, over HTTP, gRPC and the gRPC stream alike.

For each request the batcher
  - checks the sequence: a new ID must start with START (Triton's words when it does not);
  - adds the control inputs the config asks for (`control_input`: CONTROL_SEQUENCE_START, _END, _READY with
    their false/true values, _CORRID in its data type), one per batch item;
  - adds the implicit state (`state`): the state outputs the sequence's last request produced, or zeros on
    its first, and keeps what this request's state outputs hold for the next (they are not sent back);
  - runs the sequence's requests one at a time, in order;
  - forgets a sequence at END, or after `max_sequence_idle_microseconds` (Triton's default 1 s) without a
    request.

Both strategies (`direct`, `oldest`) keep these guarantees; requests of different sequences may share a
batch as the model's instances allow.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from deskpod.backends import datatypes
from deskpod.backends.types import InferRequest
from deskpod.errors import InvalidRequest, UnsupportedModel

Kind = mc.ModelSequenceBatching.Control
CONTROL_KINDS = {Kind.CONTROL_SEQUENCE_START: "start", Kind.CONTROL_SEQUENCE_END: "end",
                 Kind.CONTROL_SEQUENCE_READY: "ready", Kind.CONTROL_SEQUENCE_CORRID: "corrid"}
DEFAULT_IDLE_US = 1_000_000  # Triton's
START_FLAG, END_FLAG = 1, 2  # pb_utils' TRITONSERVER_REQUEST_FLAG_SEQUENCE_START / _END


@dataclass(frozen=True)
class _Control:
    input: str
    kind: str  # start, end, ready, corrid
    dtype: np.dtype
    values: tuple[Any, Any] = (0, 1)  # false, true


@dataclass(frozen=True)
class _State:
    input: str
    output: str
    dtype: np.dtype
    dims: tuple[int, ...]


@dataclass
class _Sequence:
    state: dict[str, np.ndarray] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last: float = field(default_factory=time.monotonic)


def check_config(config: mc.ModelConfig, source: str) -> None:
    """UnsupportedModel naming what deskpod's sequence batcher does not do."""
    batching = config.sequence_batching
    for control_input in batching.control_input:
        for control in control_input.control:
            if control.kind not in CONTROL_KINDS:
                raise UnsupportedModel(f"{source}: sequence_batching control {Kind.Name(control.kind)} is not supported")
    for state in batching.state:
        for initial in state.initial_state:
            if initial.WhichOneof("state_data") != "zero_data":
                raise UnsupportedModel(f"{source}: sequence_batching state {state.input_name!r}: only zero_data "
                                       "initial states are supported")
        if any(d < 0 for d in state.dims):
            raise UnsupportedModel(f"{source}: sequence_batching state {state.input_name!r} needs fixed dims")


class SequenceBatcher:
    def __init__(self, config: mc.ModelConfig):
        batching = config.sequence_batching
        self.model, self.batched = config.name, config.max_batch_size > 0
        self.controls = [self._control(ci.name, c) for ci in batching.control_input for c in ci.control]
        self.states = [_State(s.input_name, s.output_name, datatypes.BY_ENUM[s.data_type].dtype, tuple(s.dims))
                       for s in batching.state]
        self.idle_s = (batching.max_sequence_idle_microseconds or DEFAULT_IDLE_US) / 1e6
        self._sequences: dict[int | str, _Sequence] = {}

    @staticmethod
    def _control(name: str, control) -> _Control:
        kind = CONTROL_KINDS[control.kind]
        if kind == "corrid":
            return _Control(name, kind, datatypes.BY_ENUM[control.data_type].dtype)
        for field_name, dtype in (("int32_false_true", np.int32), ("fp32_false_true", np.float32),
                                  ("bool_false_true", np.bool_)):
            values = list(getattr(control, field_name))
            if values:
                return _Control(name, kind, np.dtype(dtype), (values[0], values[1]))
        return _Control(name, kind, np.dtype(np.int32))

    @property
    def extra_inputs(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """The inputs the batcher adds (not the client): name -> (dtype, shape after the batch dimension)."""
        extra = {c.input: (c.dtype, (1,)) for c in self.controls}
        extra.update({s.input: (s.dtype, s.dims) for s in self.states})
        return extra

    @property
    def state_outputs(self) -> tuple[str, ...]:
        return tuple(s.output for s in self.states)

    async def infer(self, request: InferRequest, run) -> Any:
        """Run `request` as its sequence's next; `run(request)` -> (response, all outputs incl. state)."""
        sequence_id, start, end = self._flags(request)
        self._forget_idle()
        sequence = self._sequences.get(sequence_id)
        if sequence is None:
            if not start:  # Triton's words
                raise InvalidRequest(f"inference request for sequence {sequence_id} to model '{self.model}' must "
                                     "specify the START flag on the first request of the sequence")
            sequence = self._sequences[sequence_id] = _Sequence()
        async with sequence.lock:
            if start:
                sequence.state.clear()
            batch = self._batch_size(request)
            inputs = dict(request.inputs)
            inputs.update(self._control_inputs(sequence_id, start, end, batch))
            inputs.update(self._state_inputs(sequence, batch))
            flags = (START_FLAG if start else 0) | (END_FLAG if end else 0)
            parameters = {**request.parameters, "_sequence": (sequence_id, flags)}
            augmented = InferRequest(request.model, inputs, request.version, request.id, request.outputs, parameters,
                                     request.classification)
            try:
                response, outputs = await run(augmented)
            finally:
                sequence.last = time.monotonic()
            for state in self.states:
                if state.output in outputs:
                    sequence.state[state.input] = np.asarray(outputs[state.output])
            if end:
                self._sequences.pop(sequence_id, None)
            return response

    def _flags(self, request: InferRequest) -> tuple[int | str, bool, bool]:
        params = request.parameters
        sequence_id = params.get("sequence_id", 0)
        if isinstance(sequence_id, str) and sequence_id.isdigit():
            sequence_id = int(sequence_id)
        if sequence_id in (0, "") or isinstance(sequence_id, bool) or not isinstance(sequence_id, (int, str)):
            raise InvalidRequest(f"inference request to model '{self.model}' must specify a non-zero or non-empty "
                                 "correlation ID (the sequence_id parameter)")
        return sequence_id, bool(params.get("sequence_start", False)), bool(params.get("sequence_end", False))

    def _batch_size(self, request: InferRequest) -> int:
        if not self.batched or not request.inputs:
            return 1
        return int(np.asarray(next(iter(request.inputs.values()))).shape[0])

    def _control_inputs(self, sequence_id, start: bool, end: bool, batch: int) -> dict[str, np.ndarray]:
        values = {"start": start, "end": end, "ready": True}
        out = {}
        for control in self.controls:
            if control.kind == "corrid":
                if control.dtype.kind in "OSU":
                    value = np.array([str(sequence_id).encode()], dtype=object)
                elif isinstance(sequence_id, str):
                    raise InvalidRequest(f"sequence ID {sequence_id!r} is a string, but model '{self.model}' takes "
                                         f"its correlation ID ({control.input}) as {control.dtype}: send a number")
                else:
                    value = np.array([sequence_id], dtype=control.dtype)
            else:
                value = np.array([control.values[values[control.kind]]], dtype=control.dtype)
            out[control.input] = np.stack([value] * batch) if self.batched else value
        return out

    def _state_inputs(self, sequence: _Sequence, batch: int) -> dict[str, np.ndarray]:
        out = {}
        for state in self.states:
            shape = ((batch,) if self.batched else ()) + state.dims
            value = sequence.state.get(state.input)
            out[state.input] = value if value is not None and value.shape == shape else np.zeros(shape, state.dtype)
        return out

    def _forget_idle(self) -> None:
        now = time.monotonic()
        for sequence_id, sequence in list(self._sequences.items()):
            if now - sequence.last > self.idle_s and not sequence.lock.locked():
                del self._sequences[sequence_id]
