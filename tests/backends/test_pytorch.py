from __future__ import annotations

import pathlib

import ml_dtypes
import numpy as np
import pytest
import torch
from backend_models import infer, pair, write_model

from deskpod.backends.pytorch import positional_order
from deskpod.errors import BackendError, CorruptModel


class AddSub(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + b, a - b


class TinyCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(image)).mean(dim=(2, 3)))


def _save(scripted: torch.jit.ScriptModule, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(scripted, str(path))


ADD_SUB_PT_CONFIG = """
backend: "pytorch"
max_batch_size: 8
input [ { name: "INPUT__1" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "OUTPUT__1" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching { }
"""

CNN_PT_CONFIG = """
platform: "pytorch_libtorch"
max_batch_size: 4
input [ { name: "image" data_type: TYPE_FP32 dims: [ 1, 8, 8 ] } ]
output [ { name: "logits" data_type: TYPE_FP32 dims: [ 3 ] } ]
"""


def test_scripted_module_with_indexed_names(root, repo_factory):
    write_model(root, "pt_add_sub", ADD_SUB_PT_CONFIG)
    _save(torch.jit.script(AddSub()), root / "pt_add_sub" / "1" / "model.pt")
    repo = repo_factory(root)
    a, b = pair(2)
    # INPUT__0 is forward's first argument although the config lists INPUT__1 first
    out = infer(repo, "pt_add_sub", INPUT__0=a, INPUT__1=b).outputs
    np.testing.assert_allclose(out["OUTPUT__0"], a + b)
    np.testing.assert_allclose(out["OUTPUT__1"], a - b)
    assert repo.metadata("pt_add_sub")["platform"] == "pytorch_libtorch"


def test_traced_cnn(root, repo_factory):
    model = TinyCNN().eval()
    image = torch.randn(3, 1, 8, 8)
    write_model(root, "pt_cnn", CNN_PT_CONFIG)
    _save(torch.jit.trace(model, image[:1]), root / "pt_cnn" / "1" / "model.pt")
    repo = repo_factory(root)
    logits = infer(repo, "pt_cnn", image=image.numpy()).outputs["logits"]
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(image).numpy(), rtol=1e-5, atol=1e-6)


class Scale(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_bfloat16_tensors(root, repo_factory):
    write_model(root, "bf16", """
    backend: "pytorch"
    input [ { name: "x" data_type: TYPE_BF16 dims: [ 3 ] } ]
    output [ { name: "y" data_type: TYPE_BF16 dims: [ 3 ] } ]
    """)
    _save(torch.jit.script(Scale()), root / "bf16" / "1" / "model.pt")
    repo = repo_factory(root)
    x = np.array([1.5, -2.0, 3.25], dtype=ml_dtypes.bfloat16)
    y = infer(repo, "bf16", x=x).outputs["y"]
    assert y.dtype == ml_dtypes.bfloat16 and y.astype(np.float32).tolist() == [3.0, -4.0, 6.5]


def test_wrong_output_count_fails_the_request(root, repo_factory):
    write_model(root, "short", CNN_PT_CONFIG.replace('output [ { name: "logits" data_type: TYPE_FP32 dims: [ 3 ] } ]',
                                                     'output [ { name: "a" data_type: TYPE_FP32 dims: [ 3 ] },'
                                                     ' { name: "b" data_type: TYPE_FP32 dims: [ 3 ] } ]'))
    _save(torch.jit.script(TinyCNN()), root / "short" / "1" / "model.pt")
    repo = repo_factory(root)
    with pytest.raises(BackendError, match="returned 1 tensors; its config declares 2 outputs"):
        infer(repo, "short", image=np.zeros((1, 1, 8, 8), np.float32))


class _Payload:
    """Unpickling this would touch a file: the proof that a pickled model file is never unpickled."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_module_is_refused_without_unpickling(root, repo_factory):
    marker = root / "unpickled"
    write_model(root, "pickled", CNN_PT_CONFIG)
    (root / "pickled" / "1").mkdir()
    torch.save({"model": _Payload(marker)}, str(root / "pickled" / "1" / "model.pt"))
    repo = repo_factory(root, load=False)
    with pytest.raises(CorruptModel, match="not a TorchScript archive.*torch.jit.save"):
        repo.load("pickled")
    assert not marker.exists()
    assert repo.index()[0]["state"] == "UNAVAILABLE"


def test_positional_order():
    assert positional_order(["INPUT__1", "INPUT__0", "INPUT__10"]) == ["INPUT__0", "INPUT__1", "INPUT__10"]
    assert positional_order(["b", "a"]) == ["b", "a"]
    assert positional_order(["x__1", "y"]) == ["x__1", "y"]
