"""QuantLinear (a Linear over a SchemeWeight) against F.linear over the dequantized weight, on whichever CPU
path is present."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deskpod.quant import SCHEMES, QuantLinear, linear, quantize
from deskpod.quant.cpu import kernel_activations
from deskpod.quant.linear import SchemeWeight


# the exact checks here are float32's wherever the CPU would take the GEMM in bfloat16 (test_cpu checks that)
pytestmark = pytest.mark.usefixtures("float32_gemm")


def _weight(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize(("m", "shape"), [(1, (16, 64)), (5, (33, 45)), (70, (8, 96))])
def test_matches_f_linear_on_the_dequantized_weight(scheme: str, m: int, shape: tuple[int, int]) -> None:
    qt = quantize(_weight(shape), scheme)
    layer = QuantLinear(qt)
    assert (layer.in_features, layer.out_features) == (shape[1], shape[0])
    x = _weight((m, shape[1]), seed=1)
    if layer.weight.kernel is not None:  # int4 and int8 run on int8-rounded activations there
        x = kernel_activations(scheme, x)
    assert _close(layer(x), F.linear(x, qt.dequantize()))


def test_keeps_leading_dims_and_dtype() -> None:
    qt = quantize(_weight((12, 32)), "nvfp4")
    x = _weight((2, 3, 32), seed=2).to(torch.bfloat16)
    layer = QuantLinear(qt)
    y = layer(x)
    assert y.shape == (2, 3, 12) and y.dtype == torch.bfloat16
    multiplied = kernel_activations("nvfp4", x.float()) if layer.weight.kernel is not None else x.float()
    assert torch.allclose(y.float(), F.linear(multiplied, qt.dequantize()), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_reference_path_in_row_chunks(scheme: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear, "CHUNK_ELEMENTS", 3 * 40)  # 3 rows at a time, a ragged last chunk
    qt = quantize(_weight((10, 40)), scheme)
    x = _weight((4, 40), seed=3)
    assert _close(linear.reference_matmul(x, qt), x @ qt.dequantize().T)


class _Kernel(nn.Module):
    """Stands in for a deskpod.quant.cpu kernel: holds its own copy of the weight."""

    def __init__(self, qt):
        super().__init__()
        self.in_features, self.out_features = qt.shape[1], qt.shape[0]
        self.register_buffer("w", qt.dequantize())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.T


def test_uses_the_cpu_kernel_when_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = types.ModuleType("deskpod.quant.cpu")
    cpu.cpu_weights = lambda qt: _Kernel(qt) if qt.scheme == "int4" else None
    monkeypatch.setitem(sys.modules, "deskpod.quant.cpu", cpu)
    int4, nv = SchemeWeight(quantize(_weight((6, 32)), "int4")), SchemeWeight(quantize(_weight((6, 32)), "nvfp4"))
    assert isinstance(int4.kernel, _Kernel) and [n for n, _ in int4.named_buffers()] == ["kernel.w"]
    assert int4.qt is None and torch.equal(nv.qt.dequantize(), quantize(_weight((6, 32)), "nvfp4").dequantize())
    assert nv.kernel is None and {n for n, _ in nv.named_buffers()} == {"weight", "weight_scale", "weight_scale_2"}
    x = _weight((2, 32), seed=4)
    assert _close(int4(x), x @ int4.kernel.w.T)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("with_kernel", [False, True])
def test_resident_buffers_are_the_quantized_tensors(scheme: str, with_kernel: bool, monkeypatch) -> None:
    if not with_kernel:
        monkeypatch.setattr(linear, "_cpu_kernel", lambda qt: None)
    qt = quantize(_weight((64, 256)), scheme)
    layer = SchemeWeight(qt)
    assert not list(layer.parameters())
    own = [name for name, _ in layer.named_buffers() if not name.startswith("kernel.")]
    if layer.kernel is None:  # the reference path keeps exactly the quantized tensors
        assert sum(b.numel() * b.element_size() for b in layer.buffers()) == qt.nbytes
        assert set(own) == set(qt.data)
    else:  # the kernel's (possibly repacked) tensors replace them: never both
        assert own == []


def test_cpu_kernel_layers_refuse_other_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = types.ModuleType("deskpod.quant.cpu")
    cpu.cpu_weights = _Kernel
    monkeypatch.setitem(sys.modules, "deskpod.quant.cpu", cpu)
    layer = QuantLinear(quantize(_weight((6, 32)), "int8"))
    with pytest.raises(ValueError, match="build it from qt.to"):
        layer(torch.zeros(2, 32, device="meta"))
