from __future__ import annotations

import json

import numpy as np
import pytest
from backend_models import add_sub_onnx, infer, save_onnx, write_model
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from deskpod.backends.config import config_to_json, read_config, validate
from deskpod.errors import CorruptModel, UnsupportedModel


def test_reads_tritons_text_format(root):
    write_model(root, "m", """
        name: "m"
        platform: "onnxruntime_onnx"
        max_batch_size: 0
        input [ { name: "x" data_type: TYPE_FP16 dims: [ 2, 3 ] reshape: { shape: [ 6 ] } } ]
        output [ { name: "y" data_type: TYPE_BF16 dims: [ -1 ] } ]
        dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100 }
        instance_group [ { count: 2 kind: KIND_CPU } ]
        version_policy: { latest: { num_versions: 2 } }
        parameters: { key: "k" value: { string_value: "v" } }
    """)
    config, fields = read_config(root / "m")
    assert config.input[0].data_type == mc.TYPE_FP16 and list(config.input[0].reshape.shape) == [6]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert config.version_policy.latest.num_versions == 2
    assert {"max_batch_size", "input", "dynamic_batching"} <= fields


def test_config_json_is_tritons(root):
    config = mc.ModelConfig(name="m", max_batch_size=4)
    config.input.add(name="x", data_type=mc.TYPE_FP32, dims=[-1, 3])
    config.dynamic_batching.max_queue_delay_microseconds = 100
    data = json.loads(config_to_json(config))
    assert data["input"][0]["dims"] == [-1, 3]  # numbers, not protobuf's int64 strings
    assert data["input"][0]["data_type"] == "TYPE_FP32"
    assert data["dynamic_batching"]["max_queue_delay_microseconds"] == 100
    assert data["output"] == [] and data["max_batch_size"] == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_batch_size: -1", "max_batch_size: -1 must be >= 0"),
        ('input [ { name: "x" dims: [ 1 ] } ]', r"input\[0\].data_type: input 'x' needs a data_type"),
        ('input [ { name: "x" data_type: TYPE_FP32 } ]', r"input\[0\].dims: input 'x' needs dims"),
        ('input [ { name: "x" data_type: TYPE_FP32 dims: [ -2 ] } ]', r"input\[0\].dims: \[-2\]"),
        ('input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] }, { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]',
         r"input\[1\].name: 'x' appears twice"),
        ('input [ { name: "x" data_type: TYPE_FP32 dims: [ 2, 3 ] reshape: { shape: [ 5 ] } } ]',
         r"input\[0\].reshape: shape \[5\] has a different element count"),
        ("max_batch_size: 4\ndynamic_batching { preferred_batch_size: [ 8 ] }",
         r"dynamic_batching.preferred_batch_size: 8 must be between 1 and max_batch_size \(4\)"),
        ("version_policy: { specific: { } }", "version_policy.specific.versions: list at least one version"),
    ],
)
def test_validation_names_the_field(text, message):
    config = mc.ModelConfig(name="m", backend="onnxruntime")
    text_format.Parse(text, config)
    if not config.input:
        config.input.add(name="in", data_type=mc.TYPE_FP32, dims=[1])
    config.output.add(name="out", data_type=mc.TYPE_FP32, dims=[1])
    with pytest.raises(CorruptModel, match=f"models/m/config.pbtxt: {message}"):
        validate(config, "models/m/config.pbtxt")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sequence_batching { state [ { input_name: 'a' output_name: 'b' data_type: TYPE_FP32 dims: [ 1 ] "
         "initial_state { data_type: TYPE_FP32 dims: [ 1 ] data_file: 'init.bin' name: 'i' } } ] }",
         "sequence_batching state 'a': only zero_data initial states"),
        ("model_transaction_policy { decoupled: true } sequence_batching { }",
         "model_transaction_policy.decoupled: a decoupled model with sequence_batching"),
    ],
)
def test_unsupported_features_are_refused(text, message):
    config = mc.ModelConfig(name="m", backend="python")
    text_format.Parse(text, config)
    config.input.add(name="in", data_type=mc.TYPE_FP32, dims=[1])
    config.output.add(name="out", data_type=mc.TYPE_FP32, dims=[1])
    with pytest.raises(UnsupportedModel, match=f"m/config.pbtxt: {message}"):
        validate(config, "m/config.pbtxt")


def test_name_must_match_folder(root, repo_factory):
    write_model(root, "m", 'name: "other"\nbackend: "onnxruntime"')
    add_sub_onnx(root / "m" / "1" / "model.onnx")
    repo = repo_factory(root)
    assert "m/config.pbtxt: name: 'other' differs from the folder name 'm'" in repo.index()[0]["reason"]


def test_unknown_backend_and_missing_files(root, repo_factory):
    write_model(root, "tf", 'platform: "tensorflow_savedmodel"')
    write_model(root, "empty", None, {"1/readme.txt": "nothing here"})
    write_model(root, "nofile", 'backend: "onnxruntime"', {"1/other.onnx": b""})
    repo = repo_factory(root, load=False)
    with pytest.raises(UnsupportedModel, match="platform: 'tensorflow_savedmodel' is not supported"):
        repo.load("tf")
    with pytest.raises(UnsupportedModel, match=r"no backend or platform, and no model.onnx / model.pt / model.py"):
        repo.load("empty")
    with pytest.raises(CorruptModel, match=r"nofile/1/model.onnx is missing"):
        repo.load("nofile")


def test_default_model_filename_and_reshape(root, repo_factory):
    write_model(root, "m", """
        backend: "onnxruntime"
        default_model_filename: "addsub.onnx"
        max_batch_size: 4
        input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 2, 2 ] reshape: { shape: [ 4 ] } },
                { name: "INPUT1" data_type: TYPE_FP32 dims: [ 4 ] } ]
        output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 2, 2 ] reshape: { shape: [ 4 ] } } ]
    """)
    add_sub_onnx(root / "m" / "1" / "addsub.onnx")
    repo = repo_factory(root)
    a = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    b = np.ones((2, 4), np.float32)
    out = infer(repo, "m", INPUT0=a, INPUT1=b).outputs["OUTPUT0"]
    assert out.shape == (2, 2, 2)
    np.testing.assert_allclose(out, a + 1)


def test_bytes_through_onnxruntime(root, repo_factory):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["same"])], "echo",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["N", 2])],
        [helper.make_tensor_value_info("same", TensorProto.STRING, ["N", 2])],
    )
    save_onnx(graph, root / "echo" / "1" / "model.onnx")
    repo = repo_factory(root)
    assert repo.metadata("echo")["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1, 2]}]
    out = infer(repo, "echo", text=np.array([["hé", "x"]])).outputs["same"]
    assert out.dtype == np.object_ and out.tolist() == [["hé".encode(), b"x"]]
