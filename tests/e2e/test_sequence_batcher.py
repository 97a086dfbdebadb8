"""The sequence batcher with the official clients: a stateful Python model (a running sum kept as implicit
state, the START / END / READY / CORRID control inputs echoed) driven over HTTP, gRPC and the gRPC stream;
sequences interleaved, started again, ended; Triton's wording for a sequence that does not start with START."""

from __future__ import annotations

import importlib.util
import queue
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from kserve_models import refused, write_model
from support.ports import free_port

ACCUMULATOR = """
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            total = pb_utils.get_input_tensor_by_name(request, "TOTAL_IN").as_numpy() + x
            controls = [pb_utils.get_input_tensor_by_name(request, n).as_numpy().reshape(-1)[0]
                        for n in ("START", "END", "READY")]
            corrid = pb_utils.get_input_tensor_by_name(request, "CORRID").as_numpy().reshape(-1)[0]
            flags = np.array([[*controls, corrid, request.flags(), request.correlation_id()]], dtype=np.int64)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("TOTAL", total),
                                                         pb_utils.Tensor("TOTAL_OUT", total),
                                                         pb_utils.Tensor("FLAGS", flags)]))
        return responses
"""
CONFIG = """
name: "accumulator"
backend: "python"
max_batch_size: 4
input [ { name: "X" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "TOTAL" data_type: TYPE_FP32 dims: [ 2 ] }, { name: "FLAGS" data_type: TYPE_INT64 dims: [ 6 ] } ]
sequence_batching {
  max_sequence_idle_microseconds: 5000000
  direct { }
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "END" control [ { kind: CONTROL_SEQUENCE_END int32_false_true: [ 0, 1 ] } ] },
    { name: "READY" control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [ 0, 1 ] } ] },
    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }
  ]
  state [ { input_name: "TOTAL_IN" output_name: "TOTAL_OUT" data_type: TYPE_FP32 dims: [ 2 ]
            initial_state: { data_type: TYPE_FP32 dims: [ 2 ] zero_data: true name: "zeros" } } ]
}
"""


def robot_example():
    """examples/robot_policy/make_repository.py, as a module."""
    path = Path(__file__).parents[2] / "examples" / "robot_policy" / "make_repository.py"
    spec = importlib.util.spec_from_file_location("make_repository", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def urls(serve, tmp_path_factory):
    root = tmp_path_factory.mktemp("sequence_repository")
    write_model(root, "accumulator", CONFIG, {"1/model.py": ACCUMULATOR})
    robot_example().write(root)
    grpc_port = free_port()
    server = serve(["--model-repository", str(root), "--grpc-port", str(grpc_port)])
    return server.url.removeprefix("http://"), f"127.0.0.1:{grpc_port}"


def step(client, module, value: float, sequence_id, start=False, end=False):
    x = module.InferInput("X", [1, 2], "FP32")
    x.set_data_from_numpy(np.full((1, 2), value, np.float32))
    result = client.infer("accumulator", [x], sequence_id=sequence_id, sequence_start=start, sequence_end=end)
    return result.as_numpy("TOTAL")[0, 0], result.as_numpy("FLAGS")[0].tolist(), result


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_sequences_keep_their_own_state(urls, protocol):
    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(urls[0] if protocol == "http" else urls[1])
    try:
        base = 100 if protocol == "http" else 200
        total, flags, result = step(client, module, 1, base + 1, start=True)
        assert total == 1 and flags == [1, 0, 1, base + 1, 1, base + 1]  # START, not END, READY, CORRID, flags
        assert result.as_numpy("TOTAL_OUT") is None  # the state stays on the server
        assert step(client, module, 10, base + 2, start=True)[0] == 10  # another sequence, interleaved
        total, flags, _ = step(client, module, 2, base + 1)
        assert total == 3 and flags[:3] == [0, 0, 1] and flags[4] == 0
        total, flags, _ = step(client, module, 3, base + 1, end=True)
        assert total == 6 and flags[:2] == [0, 1] and flags[4] == 2
        assert step(client, module, 5, base + 2, end=True)[0] == 15
        # ended: the ID must START again, in Triton's words
        error = refused(lambda: step(client, module, 1, base + 1))
        assert f"inference request for sequence {base + 1} to model 'accumulator' must specify the START flag" in error.message()
        assert step(client, module, 4, base + 1, start=True)[0] == 4  # a new sequence: zero state
        assert "correlation ID" in refused(lambda: client.infer("accumulator", [])).message()
        # a string ID where the model takes its CORRID as a number
        assert "send a number" in refused(lambda: step(client, module, 1, "robot-7", start=True)).message()
    finally:
        client.close()


def test_a_sequence_over_the_grpc_stream(urls):
    client = grpcclient.InferenceServerClient(urls[1])
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put(error or result))
    try:
        for i, value in enumerate((1.0, 2.0, 4.0)):
            x = grpcclient.InferInput("X", [1, 2], "FP32")
            x.set_data_from_numpy(np.full((1, 2), value, np.float32))
            client.async_stream_infer("accumulator", [x], sequence_id=77, sequence_start=i == 0,
                                      sequence_end=i == 2)
        totals = [results.get(timeout=30).as_numpy("TOTAL")[0, 0] for _ in range(3)]
        assert totals == [1.0, 3.0, 7.0]
    finally:
        client.stop_stream()
        client.close()


def test_the_robot_policy_keeps_each_robots_recurrent_state(urls):
    """The TorchScript GRU of examples/robot_policy: two robots' streams interleaved, each action as the same
    policy computes it locally from that robot's own history."""
    import torch

    example = robot_example()
    torch.manual_seed(0)
    policy = example.GRUPolicy().eval()
    rng = np.random.default_rng(0)
    client = grpcclient.InferenceServerClient(urls[1])
    states = {robot: torch.zeros(1, example.HIDDEN) for robot in (1, 2)}
    try:
        for step_index in range(5):
            for robot in (1, 2):
                observation = rng.standard_normal((1, example.OBSERVATION)).astype(np.float32)
                obs = grpcclient.InferInput("OBS__0", [1, example.OBSERVATION], "FP32")
                obs.set_data_from_numpy(observation)
                result = client.infer("gru_policy", [obs], sequence_id=1000 + robot, sequence_start=step_index == 0)
                with torch.no_grad():
                    want, states[robot] = policy(torch.from_numpy(observation), states[robot])
                np.testing.assert_allclose(result.as_numpy("ACTION__0"), want.numpy(), rtol=1e-5, atol=1e-6)
    finally:
        client.close()

