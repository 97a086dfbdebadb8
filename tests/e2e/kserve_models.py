"""The repository the KServe e2e tests serve, built on the spot, and one shared server for them.

Models: `add_sub` (ONNX made with onnx.helper), `py_add_sub` (a Python model written for Triton, which
rejects INPUT0 < -1000 and raises on INPUT0 > 1000), `linear` (a TorchScript module), `pipeline` (an
ensemble: add_sub's sum -> `double`, a Python model), and `broken` (an ONNX file that is not one).
The ONNX and Python builders are tests/backends' own (backend_models.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from support.ports import free_port
from tritonclient.utils import InferenceServerException

sys.path.insert(0, str(Path(__file__).parents[1] / "backends"))
from backend_models import ADD_SUB_CONFIG as BACKENDS_ADD_SUB_CONFIG
from backend_models import PY_ADD_SUB, PY_ADD_SUB_CONFIG, add_sub_onnx, write_model

WIDTH = 4
API_KEY = "kserve-secret"
PROMPT = "The three primary colours are"  # for SmolLM2, served beside the repository
MAX_REQUEST_MB = 1

# tests/backends' add_sub with a longer queue delay: 16 requests from one client arrive over a few ms,
# and the batching test needs them to meet in the queue
ADD_SUB_CONFIG = BACKENDS_ADD_SUB_CONFIG.replace("max_queue_delay_microseconds: 2000 ", "max_queue_delay_microseconds: 20000 ")
assert ADD_SUB_CONFIG != BACKENDS_ADD_SUB_CONFIG

LINEAR_CONFIG = """
name: "linear"
platform: "pytorch_libtorch"
max_batch_size: 4
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2 ] label_filename: "labels.txt" } ]
"""
LINEAR_LABELS = ["cat", "dog"]

DOUBLE_CONFIG = """
name: "double"
backend: "python"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""

DOUBLE = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            out.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("Y", x * 2)]))
        return out
"""

PIPELINE_CONFIG = """
name: "pipeline"
platform: "ensemble"
max_batch_size: 8
input [ { name: "A" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "B" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "DOUBLED_SUM" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling {
  step [
    {
      model_name: "add_sub"
      model_version: -1
      input_map { key: "INPUT0" value: "A" }
      input_map { key: "INPUT1" value: "B" }
      output_map { key: "OUTPUT0" value: "sum" }
    },
    {
      model_name: "double"
      model_version: -1
      input_map { key: "X" value: "sum" }
      output_map { key: "Y" value: "DOUBLED_SUM" }
    }
  ]
}
"""

BROKEN_CONFIG = """
name: "broken"
backend: "onnxruntime"
max_batch_size: 0
input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]
"""

LINEAR_W = torch.arange(8, dtype=torch.float32).reshape(2, WIDTH) / 8
LINEAR_B = torch.tensor([0.5, -0.5])


class Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(LINEAR_W.clone())
        self.b = torch.nn.Parameter(LINEAR_B.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.T + self.b


def linear_reference(x: np.ndarray) -> np.ndarray:
    return x @ LINEAR_W.numpy().T + LINEAR_B.numpy()


def assert_top_classes(classes: np.ndarray, scores: np.ndarray, k: int) -> None:
    """Triton's classification strings ("score:index:label", best first) against the scores they came from."""
    assert classes.shape == (len(scores), k)
    for row, entries in zip(scores, classes):
        best = sorted(range(len(row)), key=lambda i: -row[i])[:k]
        parsed = [(e.decode() if isinstance(e, bytes) else e).split(":") for e in entries]
        assert [int(p[1]) for p in parsed] == best and [p[2] for p in parsed] == [LINEAR_LABELS[i] for i in best]
        np.testing.assert_allclose([float(p[0]) for p in parsed], row[best], rtol=1e-5, atol=1e-5)


def build_repository(root: Path) -> Path:
    write_model(root, "add_sub", ADD_SUB_CONFIG)
    add_sub_onnx(root / "add_sub" / "1" / "model.onnx")
    write_model(root, "py_add_sub", PY_ADD_SUB_CONFIG, {"1/model.py": PY_ADD_SUB})
    write_model(root, "linear", LINEAR_CONFIG, {"labels.txt": "\n".join(LINEAR_LABELS) + "\n"})
    (root / "linear" / "1").mkdir()
    torch.jit.script(Linear()).save(str(root / "linear" / "1" / "model.pt"))
    write_model(root, "double", DOUBLE_CONFIG, {"1/model.py": DOUBLE})
    write_model(root, "pipeline", PIPELINE_CONFIG)
    (root / "pipeline" / "1").mkdir()
    write_model(root, "broken", BROKEN_CONFIG, {"1/model.onnx": b"this is not an ONNX model"})
    return root


def refused(call) -> InferenceServerException:
    """The error a tritonclient call raises (either protocol)."""
    with pytest.raises(InferenceServerException) as e:
        call()
    return e.value


def pair(batch: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((batch, WIDTH)).astype(np.float32) for _ in range(2))  # type: ignore[return-value]


@dataclass
class KServeServer:
    server: Any  # tests/e2e's Server: .url, .process, .log
    http_port: int
    grpc_port: int

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


_servers: dict[str, KServeServer] = {}


def shared_server(kind: str, serve: Any, tmp_path_factory: Any) -> KServeServer:
    """One server per kind for the whole session (the HTTP and gRPC tests share it; `serve` stops it):
    "main": SmolLM2 and the repository, no key; "keyed": the repository alone, behind API_KEY."""
    if kind not in _servers:
        root = build_repository(tmp_path_factory.mktemp("model_repository"))
        grpc_port = free_port()
        args = ["--model-repository", str(root), "--grpc-port", str(grpc_port), "--max-request-mb", str(MAX_REQUEST_MB)]
        if kind == "main":
            args = ["smollm2", "--kv-cache-gb", "0.25", "--ctx", "2048", *args]
        server = serve(args, api_key=API_KEY if kind == "keyed" else None)
        _servers[kind] = KServeServer(server, int(server.url.rsplit(":", 1)[1]), grpc_port)
    return _servers[kind]
