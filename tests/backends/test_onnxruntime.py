from __future__ import annotations

import numpy as np
from backend_models import (
    add_sub_onnx,
    cnn_onnx,
    cnn_reference,
    infer,
    pair,
    write_model,
)


def test_add_sub_from_config(add_sub_root, repo_factory):
    repo = repo_factory(add_sub_root)
    a, b = pair(3)
    response = infer(repo, "add_sub", INPUT0=a, INPUT1=b)
    assert list(response.outputs) == ["OUTPUT0", "OUTPUT1"]
    np.testing.assert_allclose(response.outputs["OUTPUT0"], a + b)
    np.testing.assert_allclose(response.outputs["OUTPUT1"], a - b)
    assert response.version == "1"


def test_requested_output_only(add_sub_root, repo_factory):
    repo = repo_factory(add_sub_root)
    a, b = pair(2)
    response = infer(repo, "add_sub", outputs=("OUTPUT1",), INPUT0=a, INPUT1=b)
    assert list(response.outputs) == ["OUTPUT1"]
    np.testing.assert_allclose(response.outputs["OUTPUT1"], a - b)


def test_cnn_without_config_is_autocompleted(root, repo_factory):
    cnn_onnx(root / "cnn" / "1" / "model.onnx")
    repo = repo_factory(root)
    config = repo.config("cnn")
    assert config.backend == "onnxruntime" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 4 and config.HasField("dynamic_batching")
    assert [(t.name, list(t.dims)) for t in config.input] == [("image", [1, 8, 8])]
    assert repo.metadata("cnn")["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    image = np.random.default_rng(1).standard_normal((2, 1, 8, 8)).astype(np.float32)
    logits = infer(repo, "cnn", image=image).outputs["logits"]
    np.testing.assert_allclose(logits, cnn_reference(image), rtol=1e-4, atol=1e-5)


def test_fixed_first_dim_is_not_batched(root, repo_factory):
    add_sub_onnx(root / "fixed" / "1" / "model.onnx", batch=2)
    repo = repo_factory(root)
    config = repo.config("fixed")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [2, 4]
    a, b = pair(2)
    np.testing.assert_allclose(infer(repo, "fixed", INPUT0=a, INPUT1=b).outputs["OUTPUT0"], a + b)


def test_partial_config_keeps_its_fields(root, repo_factory):
    write_model(root, "partial", 'backend: "onnxruntime"\ninstance_group [ { count: 2 } ]\n')
    add_sub_onnx(root / "partial" / "1" / "model.onnx")
    repo = repo_factory(root)
    config = repo.config("partial")
    assert config.instance_group[0].count == 2 and config.max_batch_size == 4
    assert [t.name for t in config.output] == ["OUTPUT0", "OUTPUT1"]
