"""CPU matrix kernels for quantized weights: `cpu_weights(qt)` turns a QuantizedTensor into a module that
computes x @ W.T with the weight kept compact.

Each scheme's weight stays in its stored form (repacked once at load only where a kernel wants another
order), so resident memory is the scheme's bits per weight:

    nvfp4, mxfp4   packed E2M1 codes + scale bytes        kernels/lowbit_cpu.cpp (fp4_*)
    fp8, fp8_e5m2  fp8 bytes + a float32 scale per row    kernels/lowbit_cpu.cpp (fp8_*)
    int4           ggml u4: nibbles reordered to ggml's group order, float32 scale and min per 32
    int8           ggml i8: int8 codes, float32 scale per 32        (both kernels/ggml_cpu.cpp)

Up to MATVEC_MAX_ROWS rows of x (decoding) the kernels decode each block of weights in registers and
apply it to every row; beyond that (prefill) the weight is expanded to float32 a tile of rows at a time
and multiplied with PyTorch's GEMM, whose cost then dominates. benchmarks/quant_kernels.py measures both
against F.linear on the expanded weight and against the ggml kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from deskpod.quant.ggml import MATVEC_MAX_ROWS
from deskpod.quant.kernels import ggml_cpu, lowbit_cpu

# Floats expanded per tile in the prefill path: enough rows for an efficient GEMM, small enough to stay in
# cache and never to hold a large matrix (a 49152 x 576 output head) as float32 at once.
GEMM_TILE = 1 << 20

# Scale byte -> float, from PyTorch's own float8 decodings (NVFP4 block scales are E4M3, MXFP4's E8M0).
_BYTES = torch.arange(256, dtype=torch.uint8)
E4M3_VALUES = _BYTES.view(torch.float8_e4m3fn).float()
E8M0_VALUES = _BYTES.view(torch.float8_e8m0fnu).float()


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_columns(t: torch.Tensor, width: int) -> torch.Tensor:
    """t [N, w] with zero columns appended to `width` (t itself when already that wide)."""
    return t.contiguous() if t.shape[1] == width else F.pad(t, (0, width - t.shape[1])).contiguous()


class CPUWeights(nn.Module):
    """y = x @ W.T for one quantized weight [out_features, in_features]; its buffers are all it keeps.

    `in_features` need not be a multiple of the kernel's block: the codes are zero-padded once at load and
    x is zero-padded per call (weights are finite wherever x is padded, so the padding adds exact zeros)."""

    def __init__(self, out_features: int, in_features: int, block: int):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.padded_in = _round_up(in_features, block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [M, in] float32 -> [M, out] float32
        x2 = _pad_columns(x.reshape(-1, self.in_features), self.padded_in)
        y = self._matmul(x2) if x2.shape[0] <= MATVEC_MAX_ROWS else self._tiled_gemm(x2)
        return y.view(*x.shape[:-1], self.out_features)

    def _tiled_gemm(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(x.shape[0], self.out_features)
        rows = max(1, GEMM_TILE // self.padded_in)
        for n0 in range(0, self.out_features, rows):
            n1 = min(n0 + rows, self.out_features)
            out[:, n0:n1] = F.linear(x, self._expand(n0, n1))
        return out

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] these kernels compute with."""
        return self._expand(0, self.out_features)[:, : self.in_features]

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:  # x: [M, padded_in] -> [M, out]
        raise NotImplementedError

    def _expand(self, n0: int, n1: int) -> torch.Tensor:  # float32 rows n0..n1 of W: [n1 - n0, padded_in]
        raise NotImplementedError


class FP4Weights(CPUWeights):
    """NVFP4 / MXFP4: E2M1 codes two per byte and one scale byte per block, as stored."""

    def __init__(self, qt, block: int, scale_values: torch.Tensor, tensor_scale: float):
        out_features, in_features = qt.shape
        super().__init__(out_features, in_features, block)
        self.block, self.scale_values, self.tensor_scale = block, scale_values, tensor_scale
        self.register_buffer("codes", _pad_columns(qt.data["weight"], self.padded_in // 2))  # [N, K/2] uint8
        self.register_buffer("scales", qt.data["weight_scale"].contiguous().view(torch.uint8))  # [N, K/block]

    def _args(self) -> tuple:
        return self.scale_values, self.tensor_scale, self.block

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return lowbit_cpu().fp4_matmul(x, self.codes, self.scales, *self._args())

    def _expand(self, n0: int, n1: int) -> torch.Tensor:
        return lowbit_cpu().fp4_dequantize(self.codes[n0:n1], self.scales[n0:n1], *self._args())


class FP8Weights(CPUWeights):
    """FP8 E4M3 / E5M2: one byte per weight and a float32 scale per output row, as stored."""

    def __init__(self, qt, e5m2: bool):
        out_features, in_features = qt.shape
        super().__init__(out_features, in_features, 32)
        self.e5m2 = e5m2
        self.register_buffer("codes", _pad_columns(qt.data["weight"].view(torch.uint8), self.padded_in))  # [N, K]
        self.register_buffer("row_scales", qt.data["weight_scale"].float().contiguous())  # [N]

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return lowbit_cpu().fp8_matmul(x, self.codes, self.row_scales, self.e5m2)

    def _expand(self, n0: int, n1: int) -> torch.Tensor:
        return lowbit_cpu().fp8_dequantize(self.codes[n0:n1], self.row_scales[n0:n1], self.e5m2)


def _ggml_u4_codes(packed: torch.Tensor, width: int) -> torch.Tensor:
    """[N, ceil(in/2)] nibbles in element order (2j low, 2j+1 high) -> [N, width/2] in ggml's group order
    (byte j of a group of 32: element j low, element j + 16 high), zero codes up to `width`."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    groups = _pad_columns(codes, width).view(packed.shape[0], -1, 2, 16)
    return (groups[:, :, 0] | (groups[:, :, 1] << 4)).reshape(packed.shape[0], -1).contiguous()


class U4Weights(CPUWeights):
    """int4: q in 0..15, w = q * scale + min per group of 32, on ggml's u4 kernels."""

    def __init__(self, qt):
        out_features, in_features = qt.shape
        super().__init__(out_features, in_features, 32)
        self.register_buffer("codes", _ggml_u4_codes(qt.data["weight"], self.padded_in))  # [N, K/2] uint8
        self.register_buffer("scales", qt.data["weight_scale"].float().contiguous())  # [N, K/32]
        self.register_buffer("mins", qt.data["weight_min"].float().contiguous())  # [N, K/32]

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return ggml_cpu().u4_matmul(x, self.codes, self.scales, self.mins)

    def _expand(self, n0: int, n1: int) -> torch.Tensor:
        return ggml_cpu().u4_dequantize(self.codes[n0:n1], self.scales[n0:n1], self.mins[n0:n1])


class I8Weights(CPUWeights):
    """int8: w = q * scale per group of 32, on ggml's i8 kernels."""

    def __init__(self, qt):
        out_features, in_features = qt.shape
        super().__init__(out_features, in_features, 32)
        self.register_buffer("codes", _pad_columns(qt.data["weight"], self.padded_in))  # [N, K] int8
        self.register_buffer("scales", qt.data["weight_scale"].float().contiguous())  # [N, K/32]

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return ggml_cpu().i8_matmul(x, self.codes, self.scales)

    def _expand(self, n0: int, n1: int) -> torch.Tensor:
        return ggml_cpu().i8_dequantize(self.codes[n0:n1], self.scales[n0:n1])


def _e4m3_has_nan(qt) -> bool:
    # The in-register E4M3 decoding reads every code as finite; E4M3FN's NaN (S.1111.111) is never written by
    # quantize, and a tensor holding one is left to the reference path, which propagates it.
    return bool(((qt.data["weight"].view(torch.uint8) & 0x7F) == 0x7F).any())


# scheme -> (kernel module loader, builder); a builder returns None when its kernel cannot take this tensor.
KERNELS: dict[str, tuple[Callable, Callable]] = {
    "nvfp4": (lowbit_cpu, lambda qt: FP4Weights(qt, 16, E4M3_VALUES, float(qt.data["weight_scale_2"]))),
    "mxfp4": (lowbit_cpu, lambda qt: FP4Weights(qt, 32, E8M0_VALUES, 1.0)),
    "fp8": (lowbit_cpu, lambda qt: None if _e4m3_has_nan(qt) else FP8Weights(qt, e5m2=False)),
    "fp8_e5m2": (lowbit_cpu, lambda qt: FP8Weights(qt, e5m2=True)),
    "int4": (ggml_cpu, U4Weights),
    "int8": (ggml_cpu, I8Weights),
}


def cpu_weights(qt) -> CPUWeights | None:
    """A kernel-backed module for this QuantizedTensor on the CPU, or None: no kernel for its scheme, the
    kernels could not be built here (or DESKPOD_NO_KERNELS is set), or its tensors are not on the CPU."""
    entry = KERNELS.get(qt.scheme)
    if entry is None or any(t.device.type != "cpu" for t in qt.data.values()):
        return None
    loader, build = entry
    return build(qt) if loader() is not None else None
