"""Python models in their own processes: what a model that segfaults, hangs or raises does to the server (nothing
beyond its own requests), restarts, and decoupled models (response senders, decoupled BLS) across the boundary."""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import pytest
from backend_models import ADD_SUB_CONFIG, add_sub_onnx, infer, write_model

from deskpod.backends import InferRequest
from deskpod.errors import BackendError, CorruptModel, InvalidRequest

CONFIG = """
backend: "python"
input [ { name: "X" data_type: TYPE_INT64 dims: [ 1 ] } ]
output [ { name: "Y" data_type: TYPE_INT64 dims: [ 1 ] } ]
"""

# X < 0 segfaults, X == 0 hangs, else Y = the process id (to see restarts and instances)
FRAGILE = """
import ctypes, os, time
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = int(pb_utils.get_input_tensor_by_name(request, "X").as_numpy()[0])
            if x < 0:
                ctypes.string_at(0)  # a segfault in native code, as a broken extension would
            if x == 0:
                time.sleep(3600)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", np.array([os.getpid()]))]))
        return responses
"""


def pid_of(repo, model: str) -> int:
    return int(infer(repo, model, X=np.array([1])).outputs["Y"][0])


@pytest.fixture
def neighbours(root):
    """add_sub (onnxruntime) beside the Python models: it must keep serving whatever they do."""
    write_model(root, "add_sub", ADD_SUB_CONFIG)
    add_sub_onnx(root / "add_sub" / "1" / "model.onnx")
    return root


def add_sub_serves(repo) -> None:
    a = np.ones((1, 4), np.float32)
    assert infer(repo, "add_sub", INPUT0=a, INPUT1=a).outputs["OUTPUT0"].tolist() == [[2.0] * 4]


def test_each_instance_is_a_process_of_its_own(root, repo_factory):
    write_model(root, "fragile", CONFIG + "instance_group [ { count: 2 } ]", {"1/model.py": FRAGILE})
    repo = repo_factory(root)

    async def both() -> set[int]:
        requests = [repo.infer(InferRequest("fragile", {"X": np.array([1])})) for _ in range(8)]
        return {int(r.outputs["Y"][0]) for r in await asyncio.gather(*requests)}

    pids = asyncio.run(both())
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_a_segfault_fails_its_request_and_the_model_starts_again(neighbours, repo_factory):
    write_model(neighbours, "fragile", CONFIG, {"1/model.py": FRAGILE})
    repo = repo_factory(neighbours)
    before = pid_of(repo, "fragile")
    with pytest.raises(BackendError, match="model 'fragile' failed: its process was killed by SIGSEGV"):
        infer(repo, "fragile", X=np.array([-1]))
    add_sub_serves(repo)
    after = pid_of(repo, "fragile")  # waits for the new process, then answers
    assert after != before
    assert [e["state"] for e in repo.index() if e["name"] == "fragile"] == ["READY"]


def test_a_hung_execute_is_stopped_after_its_timeout(neighbours, repo_factory):
    write_model(neighbours, "fragile", CONFIG, {"1/model.py": FRAGILE})
    repo = repo_factory(neighbours, backend_config={"python": {"execute-timeout-seconds": "1"}})
    started = time.monotonic()
    with pytest.raises(BackendError, match="did not answer execute within 1 s; its process was stopped"):
        infer(repo, "fragile", X=np.array([0]))
    assert time.monotonic() - started < 10
    add_sub_serves(repo)
    assert pid_of(repo, "fragile") > 0


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("import ctypes\nctypes.string_at(0)\n", "its process was killed by SIGSEGV"),
        ("import time\ntime.sleep(3600)\n", "did not answer initialize within 2 s"),
        ("import os\nos._exit(7)\n", "its process exited with status 7"),
        ("raise RuntimeError('no weights')\n", "initialize failed: RuntimeError: no weights"),
    ],
    ids=["segfault", "hang", "exit", "raise"],
)
def test_a_model_failing_at_load_is_unavailable_with_its_reason(neighbours, repo_factory, body, reason):
    model = "class TritonPythonModel:\n    def initialize(self, args):\n" + "".join(
        f"        {line}\n" for line in body.splitlines())
    write_model(neighbours, "broken", CONFIG, {"1/model.py": model})
    started = time.monotonic()
    repo = repo_factory(neighbours, backend_config={"python": {"stub-timeout-seconds": "2"}})
    assert time.monotonic() - started < 15
    entry = next(e for e in repo.index() if e["name"] == "broken")
    assert entry["state"] == "UNAVAILABLE" and reason in entry["reason"], entry
    add_sub_serves(repo)


def test_a_model_that_cannot_start_again_becomes_unavailable(root, repo_factory, tmp_path):
    marker = tmp_path / "started-once"
    model = FRAGILE.replace("class TritonPythonModel:", f"""class TritonPythonModel:
    def initialize(self, args):
        if os.path.exists({str(marker)!r}):
            raise RuntimeError("the GPU is gone")
        open({str(marker)!r}, "w").close()
""")
    write_model(root, "fragile", CONFIG, {"1/model.py": model})
    repo = repo_factory(root)
    with pytest.raises(BackendError, match="SIGSEGV"):
        infer(repo, "fragile", X=np.array([-1]))
    deadline = time.monotonic() + 10
    while (entry := repo.index()[0])["state"] != "UNAVAILABLE" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert entry["state"] == "UNAVAILABLE"
    assert "killed by SIGSEGV, and starting it again failed" in entry["reason"]
    assert "the GPU is gone" in entry["reason"]


def test_unknown_backend_settings_are_refused(root, repo_factory):
    write_model(root, "fragile", CONFIG, {"1/model.py": FRAGILE})
    repo = repo_factory(root, load=False, backend_config={"python": {"stub-timeout": "2"}})
    with pytest.raises(CorruptModel, match="unknown setting\\(s\\) stub-timeout; known: stub-timeout-seconds"):
        repo.load("fragile")


# --- decoupled models -------------------------------------------------------------------------------------

DECOUPLED_CONFIG = """
backend: "python"
model_transaction_policy { decoupled: true }
input [ { name: "N" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "I" data_type: TYPE_INT32 dims: [ 1 ] } ]
"""

# N responses I = 0..N-1 from a thread of its own after execute returned, then the final flag alone;
# N < 0: an error response, then final
COUNTER = """
import threading
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self.count, args=(request,)).start()
        return None

    def count(self, request):
        sender = request.get_response_sender()
        n = int(pb_utils.get_input_tensor_by_name(request, "N").as_numpy()[0])
        if n < 0:
            sender.send(pb_utils.InferenceResponse([], pb_utils.TritonError("N must be >= 0")))
        for i in range(n):
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("I", np.array([i], np.int32))]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        try:
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except pb_utils.TritonModelException as e:
            assert "Response sender has been closed" in str(e)
"""


def stream(repo, model: str, **inputs) -> list:
    async def collect() -> list:
        return [r async for r in repo.infer_stream(InferRequest(model, inputs))]

    return asyncio.run(collect())


def test_a_decoupled_model_sends_several_responses(root, repo_factory):
    write_model(root, "counter", DECOUPLED_CONFIG, {"1/model.py": COUNTER})
    repo = repo_factory(root)
    responses = stream(repo, "counter", N=np.array([3], np.int32))
    assert [r.outputs["I"].tolist() for r in responses[:-1]] == [[0], [1], [2]]
    assert [r.final for r in responses] == [False, False, False, True] and responses[-1].outputs == {}
    assert stream(repo, "counter", N=np.array([0], np.int32))[0].final
    with pytest.raises(BackendError, match="N must be >= 0"):
        stream(repo, "counter", N=np.array([-1], np.int32))
    with pytest.raises(InvalidRequest, match="doesn't support models with decoupled transaction policy"):
        infer(repo, "counter", N=np.array([1], np.int32))
    stats = repo.statistics("counter")[0]["inference_stats"]
    assert stats["success"]["count"] == 2 and stats["fail"]["count"] == 1


SUMMER_CONFIG = """
backend: "python"
input [ { name: "N" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "SUM" data_type: TYPE_INT32 dims: [ 1 ] }, { name: "COUNT" data_type: TYPE_INT32 dims: [ 1 ] } ]
"""

# decoupled BLS: iterate the counter's responses (the last, final one empty) and add them up
SUMMER = """
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            n = pb_utils.get_input_tensor_by_name(request, "N")
            call = pb_utils.InferenceRequest(model_name="counter", requested_output_names=["I"], inputs=[n])
            total = count = 0
            for response in call.exec(decoupled=True):
                if response.has_error():
                    raise pb_utils.TritonModelException(response.error().message())
                count += 1
                if response.output_tensors():
                    total += int(pb_utils.get_output_tensor_by_name(response, "I").as_numpy()[0])
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("SUM", np.array([total], np.int32)),
                                                         pb_utils.Tensor("COUNT", np.array([count], np.int32))]))
        return responses
"""


def test_decoupled_bls_iterates_the_responses(root, repo_factory):
    write_model(root, "counter", DECOUPLED_CONFIG, {"1/model.py": COUNTER})
    write_model(root, "summer", SUMMER_CONFIG, {"1/model.py": SUMMER})
    repo = repo_factory(root)
    outputs = infer(repo, "summer", N=np.array([4], np.int32)).outputs
    assert outputs["SUM"].tolist() == [6] and outputs["COUNT"].tolist() == [5]  # 4 responses and the final flag
    with pytest.raises(BackendError, match="N must be >= 0"):
        infer(repo, "summer", N=np.array([-1], np.int32))


def test_tensors_cross_the_process_boundary_intact(root, repo_factory):
    """Every datatype, an empty tensor, and one larger than the shared-memory arena (sent inline instead)."""
    config = 'backend: "python"\ninput [ { name: "A" data_type: TYPE_%s dims: [ -1 ] } ]\n' \
             'output [ { name: "B" data_type: TYPE_%s dims: [ -1 ] } ]\n'
    echo = ("import triton_python_backend_utils as pb_utils\nclass TritonPythonModel:\n"
            "    def execute(self, requests):\n        return [pb_utils.InferenceResponse([pb_utils.Tensor('B', "
            "pb_utils.get_input_tensor_by_name(r, 'A').as_numpy())]) for r in requests]\n")
    kinds = {"FP32": np.float32, "FP16": np.float16, "INT8": np.int8, "UINT64": np.uint64, "BOOL": np.bool_,
             "STRING": np.object_}
    for kind in kinds:
        write_model(root, f"echo_{kind.lower()}", config % (kind, kind), {"1/model.py": echo})
    repo = repo_factory(root)
    rng = np.random.default_rng(0)
    for kind, dtype in kinds.items():
        for size in (0, 5, (9 << 20) // np.dtype(dtype).itemsize if kind != "STRING" else 3):
            if kind == "STRING":
                value = np.array([f"é{i}".encode() * (i + 1) for i in range(size)], dtype=np.object_)
            else:
                value = (rng.standard_normal(size) * 100).astype(dtype)
            got = infer(repo, f"echo_{kind.lower()}", A=value).outputs["B"]
            assert got.dtype == value.dtype and got.shape == value.shape and (got == value).all(), (kind, size)


LEAKY = """
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def initialize(self, args):
        self.kept = []

    def execute(self, requests):
        responses = []
        for request in requests:
            self.kept.append(np.ones(16 << 20, np.uint8))  # 16 MiB a request, never let go
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", np.array([len(self.kept)]))]))
        return responses
"""


def test_a_leaking_model_is_started_again_when_it_runs_out_of_its_memory(neighbours, repo_factory):
    write_model(neighbours, "leaky", CONFIG, {"1/model.py": LEAKY})
    repo = repo_factory(neighbours, backend_config={"python": {"memory-limit-mb": "600"}})
    counts = []
    with pytest.raises(BackendError, match="MemoryError: it ran out of its memory limit"):
        for _ in range(100):
            counts.append(int(infer(repo, "leaky", X=np.array([1])).outputs["Y"][0]))
    assert 5 < len(counts) < 40 and counts == list(range(1, len(counts) + 1)), counts
    add_sub_serves(repo)
    assert infer(repo, "leaky", X=np.array([1])).outputs["Y"].tolist() == [1]  # a fresh process, its memory freed
