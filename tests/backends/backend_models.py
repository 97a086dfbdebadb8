"""Model builders for tests/backends: repositories built on the spot: ONNX graphs made with onnx.helper, TorchScript modules, Python models
and ensembles, each in the Triton layout `ROOT/<model>/config.pbtxt` + `ROOT/<model>/<version>/<file>`."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from deskpod.backends import InferRequest, InferResponse, ModelRepository

ADD_SUB_CONFIG = """
name: "add_sub"
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "INPUT1" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching { max_queue_delay_microseconds: 2000 }
"""


def save_onnx(graph: onnx.GraphProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what onnxruntime 1.17+ reads
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def add_sub_onnx(path: Path, batch: str | int = "batch", width: int = 4) -> Path:
    """OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 on FP32 [batch, width]."""
    shape = [batch, width]
    graph = helper.make_graph(
        [helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]), helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"])],
        "add_sub",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("INPUT0", "INPUT1")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("OUTPUT0", "OUTPUT1")],
    )
    return save_onnx(graph, path)


def cnn_onnx(path: Path, seed: int = 0) -> Path:
    """A small CNN: [N,1,8,8] -> Conv(4, 3x3, pad 1) -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> [N,3]."""
    rng = np.random.default_rng(seed)
    weights = {
        "conv_w": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
        "conv_b": rng.standard_normal(4).astype(np.float32),
        "fc_w": rng.standard_normal((3, 4)).astype(np.float32),
        "fc_b": rng.standard_normal(3).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        initializer=[onnx.numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return save_onnx(graph, path)


def cnn_reference(image: np.ndarray, seed: int = 0) -> np.ndarray:
    """The same CNN in numpy, to check the served one against."""
    rng = np.random.default_rng(seed)
    conv_w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    conv_b = rng.standard_normal(4).astype(np.float32)
    fc_w = rng.standard_normal((3, 4)).astype(np.float32)
    fc_b = rng.standard_normal(3).astype(np.float32)
    padded = np.pad(image[:, 0], ((0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))  # [N,8,8,3,3]
    conv = np.einsum("nhwij,cij->nchw", windows, conv_w[:, 0]) + conv_b[None, :, None, None]
    pooled = np.maximum(conv, 0).mean(axis=(2, 3))
    return pooled @ fc_w.T + fc_b


def write_model(root: Path, name: str, config: str | None, files: dict[str, bytes | str] | None = None) -> Path:
    """ROOT/name/config.pbtxt (when given) and files by relative path, e.g. {"1/model.py": "..."}."""
    model_dir = root / name
    model_dir.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (model_dir / "config.pbtxt").write_text(textwrap.dedent(config))
    for rel, content in (files or {}).items():
        target = model_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            target.write_text(textwrap.dedent(content))
        else:
            target.write_bytes(content)
    return model_dir


def infer(repo: ModelRepository, model: str, outputs: tuple[str, ...] | None = None, **inputs: np.ndarray) -> InferResponse:
    """One request on a fresh event loop (the batcher binds to whichever loop calls it)."""
    return asyncio.run(repo.infer(InferRequest(model=model, inputs=inputs, outputs=outputs)))


def pair(batch: int = 1, width: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((batch, width)).astype(np.float32),
        rng.standard_normal((batch, width)).astype(np.float32),
    )


# --- Python models (model.py imports triton_python_backend_utils, exactly as under Triton) ---------------

PY_ADD_SUB_CONFIG = """
name: "py_add_sub"
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "INPUT1" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching { }
"""

PY_ADD_SUB = '''
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.args = args
        self.model_config = json.loads(args["model_config"])
        self.out0_dtype = pb_utils.triton_string_to_numpy(
            pb_utils.get_output_config_by_name(self.model_config, "OUTPUT0")["data_type"]
        )

    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            if (a < -1000).any():  # a request the model itself rejects
                responses.append(pb_utils.InferenceResponse([], error=pb_utils.TritonError("INPUT0 below -1000")))
                continue
            if (a > 1000).any():  # a crash inside the model's code
                raise ValueError("INPUT0 above 1000")
            if (a == 777).any():  # a model that tries to end the process
                raise SystemExit(5)
            out0 = pb_utils.Tensor("OUTPUT0", (a + b).astype(self.out0_dtype))
            out1 = pb_utils.Tensor("OUTPUT1", a - b)
            responses.append(pb_utils.InferenceResponse(output_tensors=[out0, out1]))
        return responses
'''


# records when each execution starts and ends; waits (at most 10 s) until `wait_for` executions have started,
# which only executions running in parallel achieve: overlapping windows prove parallelism, not timing
WINDOWS_MODEL = """
import json
import os
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.name = args["model_instance_name"]
        config = json.loads(args["model_config"])
        self.log = config["parameters"]["log"]["string_value"]
        self.wait_for = int(config["parameters"]["wait_for"]["string_value"])

    def _started(self):
        with open(self.log) as f:
            return sum(1 for line in f if line.startswith("start"))

    def execute(self, requests):
        with open(self.log, "a") as f:
            f.write(f"start {self.name}\\n")
        # wait (bounded) until `wait_for` executions have started: only instances running in parallel get there
        deadline = time.monotonic() + 10
        while self._started() < self.wait_for and time.monotonic() < deadline:
            time.sleep(0.005)
        with open(self.log, "a") as f:
            f.write(f"end {self.name}\\n")
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", r.inputs()[0].as_numpy())]) for r in requests]
"""
