"""The sequence batcher alone: control values in each data type, string correlation IDs, state carried and
reset, idle sequences forgotten, configs it cannot serve refused by name."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from deskpod.backends.sequence import SequenceBatcher, check_config
from deskpod.backends.types import InferRequest, InferResponse
from deskpod.errors import InvalidRequest, UnsupportedModel

CONFIG = """
name: "m" max_batch_size: 0
input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]
sequence_batching {
  max_sequence_idle_microseconds: 50000
  oldest { }
  control_input [ { name: "S" control [ { kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0.5, 2.5 ] } ] },
                  { name: "ID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_STRING } ] } ]
  state [ { input_name: "H_IN" output_name: "H_OUT" data_type: TYPE_FP32 dims: [ 1 ] } ]
}
"""


def batcher(config: str = CONFIG) -> SequenceBatcher:
    return SequenceBatcher(text_format.Parse(config, mc.ModelConfig()))


def run_step(seq: SequenceBatcher, sequence_id, x: float, start=False, end=False) -> dict:
    seen = {}

    async def run(request: InferRequest):
        seen.update(request.inputs)
        state = request.inputs["H_IN"] + request.inputs["X"]
        return InferResponse("m", "1", "", {"Y": state}), {"Y": state, "H_OUT": state}

    request = InferRequest("m", {"X": np.array([x], np.float32)},
                           parameters={"sequence_id": sequence_id, "sequence_start": start, "sequence_end": end})
    response = asyncio.run(seq.infer(request, run))
    return {**seen, "Y": response.outputs["Y"]}


def test_string_ids_controls_and_state():
    seq = batcher()
    first = run_step(seq, "robot-1", 1.0, start=True)
    assert first["S"].tolist() == [2.5] and first["ID"].tolist() == [b"robot-1"] and first["Y"].tolist() == [1.0]
    second = run_step(seq, "robot-1", 2.0)
    assert second["S"].tolist() == [0.5] and second["Y"].tolist() == [3.0]
    assert run_step(seq, "robot-1", 1.0, start=True)["Y"].tolist() == [1.0]  # START again: the state resets


def test_idle_sequences_are_forgotten():
    seq = batcher()
    run_step(seq, "r", 1.0, start=True)
    time.sleep(0.1)  # past max_sequence_idle_microseconds (50 ms)
    with pytest.raises(InvalidRequest, match="must specify the START flag"):
        run_step(seq, "r", 1.0)


def test_configs_it_cannot_serve_are_refused():
    bad = CONFIG.replace("data_type: TYPE_FP32 dims: [ 1 ] } ]\n}", "data_type: TYPE_FP32 dims: [ -1 ] } ]\n}")
    with pytest.raises(UnsupportedModel, match="needs fixed dims"):
        check_config(text_format.Parse(bad, mc.ModelConfig()), "m/config.pbtxt")
