from __future__ import annotations

import asyncio

import numpy as np
import pytest
from backend_models import add_sub_onnx, infer, pair, write_model

from deskpod.backends import InferRequest, ModelRepository
from deskpod.errors import CorruptModel, InvalidRequest, ModelNotFound, ModelNotReady


def test_index_metadata_config(add_sub_root, repo_factory):
    repo = repo_factory(add_sub_root)
    assert repo.index() == [{"name": "add_sub", "version": "1", "state": "READY", "reason": ""}]
    assert repo.ready("add_sub") and repo.ready("add_sub", "1") and not repo.ready("add_sub", "2")
    assert "add_sub" in repo and "nope" not in repo and ".." not in repo
    meta = repo.metadata("add_sub")
    assert meta["name"] == "add_sub" and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["outputs"][1] == {"name": "OUTPUT1", "datatype": "FP32", "shape": [-1, 4]}
    assert repo.config("add_sub").dynamic_batching.max_queue_delay_microseconds == 2000


def test_broken_model_is_unavailable_while_others_serve(add_sub_root, repo_factory):
    write_model(add_sub_root, "broken", None, {"1/model.onnx": b"this is not a protobuf"})
    repo = repo_factory(add_sub_root)
    states = {e["name"]: e for e in repo.index()}
    assert states["add_sub"]["state"] == "READY"
    assert states["broken"]["state"] == "UNAVAILABLE"
    assert "model.onnx" in states["broken"]["reason"] and "onnxruntime cannot load it" in states["broken"]["reason"]
    with pytest.raises(ModelNotReady, match="onnxruntime cannot load it"):
        infer(repo, "broken", x=np.zeros(1, np.float32))
    with pytest.raises(CorruptModel):
        repo.load("broken")
    a, b = pair()
    np.testing.assert_allclose(infer(repo, "add_sub", INPUT0=a, INPUT1=b).outputs["OUTPUT0"], a + b)


def test_bad_config_names_file_and_field(root, repo_factory):
    write_model(root, "bad", 'backend: "onnxruntime"\ninput [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 0 ] } ]\n'
                'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n')
    add_sub_onnx(root / "bad" / "1" / "model.onnx")
    write_model(root, "typo", "max_batch_sise: 3\n")
    repo = repo_factory(root)
    reasons = {e["name"]: e["reason"] for e in repo.index()}
    assert "bad/config.pbtxt: input[0].dims" in reasons["bad"]
    assert "typo/config.pbtxt" in reasons["typo"] and "max_batch_sise" in reasons["typo"]


def test_config_disagreeing_with_onnx_file(root, repo_factory):
    write_model(root, "m", 'backend: "onnxruntime"\nmax_batch_size: 8\n'
                'input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
                'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n')
    add_sub_onnx(root / "m" / "1" / "model.onnx")
    repo = repo_factory(root, load=False)
    with pytest.raises(CorruptModel, match=r"input\[0\].name: 'X' is not an input of .*model.onnx"):
        repo.load("m")


def test_unknown_model(add_sub_root, repo_factory):
    repo = repo_factory(add_sub_root)
    with pytest.raises(ModelNotFound):
        infer(repo, "nope", x=np.zeros(1))
    with pytest.raises(ModelNotFound):
        repo.load("nope")
    with pytest.raises(ModelNotFound):
        repo.load("../etc")
    with pytest.raises(ModelNotFound):
        repo.metadata("nope")


def test_load_unload_without_restart(add_sub_root, repo_factory):
    repo = repo_factory(add_sub_root, load=False)
    assert repo.index() == [{"name": "add_sub", "version": "", "state": "", "reason": ""}]
    with pytest.raises(ModelNotReady, match="not loaded"):
        infer(repo, "add_sub", INPUT0=pair()[0], INPUT1=pair()[1])
    repo.load("add_sub")
    assert repo.ready("add_sub")
    repo.unload("add_sub")
    assert repo.index() == [{"name": "add_sub", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}]
    with pytest.raises(ModelNotReady):
        repo.config("add_sub")
    # a new model dropped into the folder loads without a restart
    add_sub_onnx(add_sub_root / "later" / "1" / "model.onnx")
    repo.load("later")
    assert repo.index(ready_only=True) == [{"name": "later", "version": "1", "state": "READY", "reason": ""}]


def test_load_with_config_override(add_sub_root, repo_factory):
    repo = repo_factory(add_sub_root, load=False)
    repo.load("add_sub", config_json='{"backend": "onnxruntime", "max_batch_size": 2}')
    assert repo.config("add_sub").max_batch_size == 2
    with pytest.raises(CorruptModel, match="the config given to load"):
        repo.load("add_sub", config_json="{not json")
    assert repo.ready("add_sub")  # a failed reload leaves the serving version as it was


def test_version_policies(root, repo_factory):
    for version in ("1", "2", "3"):
        add_sub_onnx(root / "latest" / version / "model.onnx")
        add_sub_onnx(root / "all" / version / "model.onnx")
        add_sub_onnx(root / "specific" / version / "model.onnx")
    write_model(root, "all", "version_policy: { all: {} }")
    write_model(root, "specific", "version_policy: { specific: { versions: [1, 3] } }")
    repo = repo_factory(root)
    versions = {}
    for e in repo.index(ready_only=True):
        versions.setdefault(e["name"], []).append(e["version"])
    assert versions == {"all": ["1", "2", "3"], "latest": ["3"], "specific": ["1", "3"]}
    assert infer(repo, "specific", INPUT0=pair()[0], INPUT1=pair()[1]).version == "3"
    request = InferRequest(model="specific", version="1", inputs=dict(zip(("INPUT0", "INPUT1"), pair())))
    assert asyncio.run(repo.infer(request)).version == "1"
    with pytest.raises(ModelNotFound, match="no version 2"):
        asyncio.run(repo.infer(InferRequest(model="specific", version="2", inputs={})))


@pytest.mark.parametrize(
    ("inputs", "outputs", "message"),
    [
        ({"INPUT0": np.zeros((1, 3), np.float32), "INPUT1": np.zeros((1, 4), np.float32)}, None,
         r"input 'INPUT0' has shape \[1, 3\]; model 'add_sub' expects \[-1, 4\]"),
        ({"INPUT0": np.zeros((1, 4), np.int32), "INPUT1": np.zeros((1, 4), np.float32)}, None,
         "input 'INPUT0' has datatype INT32; model 'add_sub' expects FP32"),
        ({"INPUT0": np.zeros((1, 4), np.float32)}, None,
         r"missing input 'INPUT1' for model 'add_sub': it expects FP32 with shape \[-1, 4\]"),
        ({"INPUT0": np.zeros((1, 4), np.float32), "INPUT1": np.zeros((1, 4), np.float32), "EXTRA": np.zeros(1)}, None,
         "unknown input 'EXTRA' for model 'add_sub'; its inputs are: INPUT0, INPUT1"),
        ({"INPUT0": np.zeros((1, 4), np.float32), "INPUT1": np.zeros((1, 4), np.float32)}, ("OUTPUT9",),
         "unknown output 'OUTPUT9' requested from model 'add_sub'; its outputs are: OUTPUT0, OUTPUT1"),
        ({"INPUT0": np.zeros((9, 4), np.float32), "INPUT1": np.zeros((9, 4), np.float32)}, None,
         "input 'INPUT0' has batch size 9; model 'add_sub' takes 1 to max_batch_size 8"),
        ({"INPUT0": np.zeros((2, 4), np.float32), "INPUT1": np.zeros((3, 4), np.float32)}, None,
         r"must share one batch size; got \[2, 3\]"),
    ],
    ids=["shape", "datatype", "missing", "unknown-input", "unknown-output", "over-max-batch", "mixed-batch"],
)
def test_bad_requests(add_sub_root, repo_factory, inputs, outputs, message):
    repo = repo_factory(add_sub_root)
    with pytest.raises(InvalidRequest, match=message):
        asyncio.run(repo.infer(InferRequest(model="add_sub", inputs=inputs, outputs=outputs)))
    assert repo.statistics("add_sub")[0]["inference_stats"]["fail"]["count"] == 1


def test_statistics_shape(add_sub_root, repo_factory):
    repo = repo_factory(add_sub_root)
    a, b = pair(3)
    infer(repo, "add_sub", INPUT0=a, INPUT1=b)
    (stats,) = repo.statistics("add_sub")
    assert set(stats) == {"name", "version", "last_inference", "inference_count", "execution_count",
                          "inference_stats", "batch_stats"}
    assert stats["inference_count"] == 3 and stats["execution_count"] == 1 and stats["last_inference"] > 0
    inference = stats["inference_stats"]
    assert set(inference) == {"success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
                              "cache_hit", "cache_miss"}
    assert inference["success"]["count"] == 1 and inference["success"]["ns"] > 0
    assert inference["compute_infer"]["count"] == 1 and inference["compute_infer"]["ns"] > 0
    assert stats["batch_stats"] == [
        {"batch_size": 3, **{k: v for k, v in stats["batch_stats"][0].items() if k != "batch_size"}}
    ]
    assert stats["batch_stats"][0]["compute_infer"]["count"] == 1
    assert repo.statistics() == [stats]


def test_repository_root_must_exist(tmp_path):
    with pytest.raises(ModelNotFound):
        ModelRepository(tmp_path / "missing")


def test_reload_picks_up_a_new_version(add_sub_root, repo_factory):
    repo = repo_factory(add_sub_root)
    add_sub_onnx(add_sub_root / "add_sub" / "2" / "model.onnx")
    repo.load("add_sub")
    assert repo.index() == [
        {"name": "add_sub", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"},
        {"name": "add_sub", "version": "2", "state": "READY", "reason": ""},
    ]
    assert infer(repo, "add_sub", INPUT0=pair()[0], INPUT1=pair()[1]).version == "2"


def test_failed_reload_keeps_serving(add_sub_root, repo_factory):
    repo = repo_factory(add_sub_root)
    write_model(add_sub_root, "add_sub", None, {"3/model.onnx": b"garbage"})
    with pytest.raises(CorruptModel, match="3/model.onnx"):
        repo.load("add_sub")
    entries = {e["version"]: e for e in repo.index()}
    assert entries["1"]["state"] == "READY"
    assert entries["3"]["state"] == "UNAVAILABLE" and "onnxruntime cannot load it" in entries["3"]["reason"]
    assert infer(repo, "add_sub", INPUT0=pair()[0], INPUT1=pair()[1]).version == "1"
