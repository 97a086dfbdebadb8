"""QuantLinear: y = x @ W^T with W kept quantized.

Where the weight lives decides the path: on CUDA the fused Triton dequantize+matmul kernel
(kernels/triton_lowbit.py); on CPU the kernel of deskpod.quant.cpu when it has one for the scheme,
otherwise a reference path that dequantizes a few rows at a time (memory stays bounded) and multiplies.
The module's buffers are exactly what stays resident, so summing them gives resident weight memory.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch
from torch import nn

from deskpod.quant.tensor import QuantizedTensor

log = logging.getLogger(__name__)

# the reference path expands at most this many weights at once (16 MiB of float32)
CHUNK_ELEMENTS = 1 << 22


def _cpu_kernel(qt: QuantizedTensor) -> nn.Module | None:
    """deskpod.quant.cpu.cpu_weights(qt) when that module exists; None otherwise."""
    try:
        cpu = importlib.import_module("deskpod.quant.cpu")
    except ModuleNotFoundError as e:
        if e.name != "deskpod.quant.cpu":
            raise
        return None
    return cpu.cpu_weights(qt)


@functools.cache
def _triton():
    """The Triton kernels module, or None where triton is not installed (then CUDA uses the reference path)."""
    try:
        from deskpod.quant.kernels import triton_lowbit
    except ImportError as e:
        log.warning("deskpod: Triton unavailable (%s): quantized layers on CUDA dequantize row chunks instead", e)
        return None
    return triton_lowbit


def reference_matmul(x: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """x [M, in] @ dequantize(qt)^T -> [M, out] in float32, expanding the weight in row chunks."""
    out, inp = qt.shape
    step = max(1, CHUNK_ELEMENTS // max(inp, 1))
    x = x.float()
    return torch.cat([x @ qt.rows(r, r + step).dequantize().T for r in range(0, out, step)], dim=1)


class QuantLinear(nn.Module):
    """A bias-free linear layer over a QuantizedTensor weight [out, in]."""

    def __init__(self, qt: QuantizedTensor):
        super().__init__()
        self.scheme, self.in_features, self.out_features = qt.scheme, qt.shape[1], qt.shape[0]
        self.kernel = _cpu_kernel(qt) if qt.data["weight"].device.type == "cpu" else None
        self._names = [] if self.kernel is not None else list(qt.data)
        for name in self._names:  # when the CPU kernel holds (repacked) weights, don't keep a second copy
            self.register_buffer(name, qt.data[name])

    @property
    def qt(self) -> QuantizedTensor | None:
        """The weight as a QuantizedTensor over this module's buffers; None when a CPU kernel holds it."""
        if self.kernel is not None:
            return None
        data = {n: getattr(self, n) for n in self._names}
        return QuantizedTensor(self.scheme, (self.out_features, self.in_features), data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        if self.kernel is not None and x.dtype == torch.float32 and x.device.type == "cpu":
            return self.kernel(x)  # the engine's decode step: no reshapes or casts around the kernel
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.kernel is not None:
            if x2.device.type != "cpu":
                raise ValueError(
                    "this QuantLinear holds CPU kernel weights; build it from qt.to(device) to run on "
                    f"{x2.device}, not by moving the module"
                )
            y = self.kernel(x2.float())
        elif x2.is_cuda and _triton() is not None:
            y = _triton().matmul(x2, self.qt)
        else:
            y = reference_matmul(x2, self.qt)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"
