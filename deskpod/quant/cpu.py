"""CPU matrix kernels for quantized weights: `cpu_weights(qt)` turns a QuantizedTensor into a module that
computes x @ W.T with the weight kept at its stored bits per weight (kernels/lowbit_cpu.cpp):

    nvfp4, mxfp4   packed E2M1 codes + an E4M3 / E8M0 scale byte per 16 / 32     4.5 / 4.25 bits
    fp8, fp8_e5m2  fp8 bytes + a float32 scale per row                            8 bits
    int4           packed codes + float16 scale and min per 32                    5 bits
    int8           int8 codes + a float16 scale per 32                            8.5 bits

At load, rows are zero-padded to whole units of 32 inputs (only when `in` is ragged) and 4-bit codes are
reordered within each unit (same bytes); nothing is widened. Up to MATVEC_MAX_ROWS rows of x (decoding) the
kernels decode each block of weights in registers and apply it to up to 8 rows at once; beyond that (prefill,
large batches) the weight is expanded to float32 a tile of rows at a time for PyTorch's GEMM, whose cost then
dominates. benchmarks/quant_kernels.py measures both against F.linear on the expanded float32 weight and
against the engine's kernels over GGUF's Q4_0 / Q8_0 blocks (deskpod.quant.ggml).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from deskpod.quant.kernels import lowbit_cpu

# Up to this many rows of x the matvec kernels (each block decoded once per 8 rows, AVX2 FMAs) beat expanding
# the weight to float32 for PyTorch's GEMM; from about 24 rows on the GEMM wins (benchmarks/quant_kernels.py
# --crossover: with 1 and 2 threads, for SmolLM2's 576x1536 and 1536x576 matrices, the crossover is 20-28 rows).
MATVEC_MAX_ROWS = 20
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


def _unit_order(packed: torch.Tensor, width: int) -> torch.Tensor:
    """4-bit codes [N, ceil(in/2)] in element order (element 2j in the low nibble of byte j, 2j+1 in the high)
    -> [N, width/2] in the kernels' unit order (per 32 elements, byte j holds element j low and j + 16 high:
    ggml's order, which splits into elements in order without a shuffle), zero codes up to `width`."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    units = _pad_columns(codes, width).view(packed.shape[0], -1, 2, 16)
    return (units[:, :, 0] | (units[:, :, 1] << 4)).reshape(packed.shape[0], -1).contiguous()


class CPUWeights(nn.Module):
    """y = x @ W.T for one quantized weight [out_features, in_features]; its buffers are all it keeps.

    The kernels work in units of 32 inputs: when `in_features` is not a multiple of 32 the codes (and scales)
    are zero-padded once at load and x per call (weights are finite wherever x is padded, so the padding adds
    exact zeros)."""

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.padded_in = _round_up(in_features, 32)

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

    def _matmul(self, x: torch.Tensor, portable: bool = False) -> torch.Tensor:
        """x [M, padded_in] -> [M, out] on the matvec kernels (portable: their scalar version)."""
        raise NotImplementedError

    def _expand(self, n0: int, n1: int, portable: bool = False) -> torch.Tensor:
        """Rows n0..n1 of the weight as float32: [n1 - n0, padded_in]."""
        raise NotImplementedError


class FP4Weights(CPUWeights):
    """NVFP4 / MXFP4: E2M1 codes two per byte (in unit order) and one scale byte per block of 16 / 32."""

    def __init__(self, qt, block: int, scale_values: torch.Tensor, tensor_scale: float):
        super().__init__(*qt.shape)
        self.block, self.scale_values, self.tensor_scale = block, scale_values, tensor_scale
        self.register_buffer("codes", _unit_order(qt.data["weight"], self.padded_in))  # [N, K/2] uint8
        scales = qt.data["weight_scale"].contiguous().view(torch.uint8)
        self.register_buffer("scales", _pad_columns(scales, self.padded_in // block))  # [N, K/block] uint8

    def _args(self) -> tuple:
        return self.scale_values, self.tensor_scale, self.block

    def _matmul(self, x: torch.Tensor, portable: bool = False) -> torch.Tensor:
        return lowbit_cpu().fp4_matmul(x, self.codes, self.scales, *self._args(), portable=portable)

    def _expand(self, n0: int, n1: int, portable: bool = False) -> torch.Tensor:
        return lowbit_cpu().fp4_dequantize(self.codes[n0:n1], self.scales[n0:n1], *self._args(), portable=portable)


class FP8Weights(CPUWeights):
    """FP8 E4M3 / E5M2: one byte per weight and a float32 scale per output row, as stored."""

    def __init__(self, qt, e5m2: bool):
        super().__init__(*qt.shape)
        self.e5m2 = e5m2
        self.register_buffer("codes", _pad_columns(qt.data["weight"].view(torch.uint8), self.padded_in))  # [N, K]
        self.register_buffer("row_scales", qt.data["weight_scale"].float().contiguous())  # [N]

    def _matmul(self, x: torch.Tensor, portable: bool = False) -> torch.Tensor:
        return lowbit_cpu().fp8_matmul(x, self.codes, self.row_scales, self.e5m2, portable=portable)

    def _expand(self, n0: int, n1: int, portable: bool = False) -> torch.Tensor:
        return lowbit_cpu().fp8_dequantize(self.codes[n0:n1], self.row_scales[n0:n1], self.e5m2, portable=portable)


class Int4Weights(CPUWeights):
    """int4: q in 0..15 two per byte (in unit order), w = q * scale + min, float16 scale and min per 32."""

    def __init__(self, qt):
        super().__init__(*qt.shape)
        self.register_buffer("codes", _unit_order(qt.data["weight"], self.padded_in))  # [N, K/2] uint8
        self.register_buffer("scales", qt.data["weight_scale"].contiguous())  # [N, K/32] float16
        self.register_buffer("mins", qt.data["weight_min"].contiguous())  # [N, K/32] float16

    def _matmul(self, x: torch.Tensor, portable: bool = False) -> torch.Tensor:
        return lowbit_cpu().int4_matmul(x, self.codes, self.scales, self.mins, portable=portable)

    def _expand(self, n0: int, n1: int, portable: bool = False) -> torch.Tensor:
        return lowbit_cpu().int4_dequantize(self.codes[n0:n1], self.scales[n0:n1], self.mins[n0:n1], portable=portable)


class Int8Weights(CPUWeights):
    """int8: w = q * scale with a float16 scale per 32, as stored."""

    def __init__(self, qt):
        super().__init__(*qt.shape)
        self.register_buffer("codes", _pad_columns(qt.data["weight"], self.padded_in))  # [N, K] int8
        self.register_buffer("scales", qt.data["weight_scale"].contiguous())  # [N, K/32] float16

    def _matmul(self, x: torch.Tensor, portable: bool = False) -> torch.Tensor:
        return lowbit_cpu().int8_matmul(x, self.codes, self.scales, portable=portable)

    def _expand(self, n0: int, n1: int, portable: bool = False) -> torch.Tensor:
        return lowbit_cpu().int8_dequantize(self.codes[n0:n1], self.scales[n0:n1], portable=portable)


def _e4m3_has_nan(qt) -> bool:
    # The in-register E4M3 decoding reads every code as finite; E4M3FN's NaN (S.1111.111) is never written by
    # quantize, and a tensor holding one is left to the reference path, which propagates it.
    return bool(((qt.data["weight"].view(torch.uint8) & 0x7F) == 0x7F).any())


# scheme -> builder; a builder returns None when its kernel cannot take this tensor.
KERNELS: dict[str, Callable[..., CPUWeights | None]] = {
    "nvfp4": lambda qt: FP4Weights(qt, 16, E4M3_VALUES, float(qt.data["weight_scale_2"])),
    "mxfp4": lambda qt: FP4Weights(qt, 32, E8M0_VALUES, 1.0),
    "fp8": lambda qt: None if _e4m3_has_nan(qt) else FP8Weights(qt, e5m2=False),
    "fp8_e5m2": lambda qt: FP8Weights(qt, e5m2=True),
    "int4": Int4Weights,
    "int8": Int8Weights,
}


def cpu_weights(qt) -> CPUWeights | None:
    """A kernel-backed module for this QuantizedTensor on the CPU, or None: no kernel for its scheme, the
    kernels could not be built here (or DESKPOD_NO_KERNELS is set), or its tensors are not on the CPU."""
    build = KERNELS.get(qt.scheme)
    if build is None or lowbit_cpu() is None or any(t.device.type != "cpu" for t in qt.data.values()):
        return None
    return build(qt)
