"""CPU matrix kernels for quantized weights: `cpu_weights(qt)` turns a QuantizedTensor into a module that
computes x @ W.T with the weight kept at its stored bits per weight (kernels/lowbit_cpu.cpp, ggml_blocks.cpp):

    nvfp4, mxfp4   packed E2M1 codes + an E4M3 / E8M0 scale byte per 16 / 32     4.5 / 4.25 bits
    fp8, fp8_e5m2  fp8 bytes + a float32 scale per row                            8 bits
    int4           packed codes + float16 scale and min per 32 (GGUF's Q4_1)      5 bits
    int8           int8 codes + a float16 scale per 32 (GGUF's Q8_0)              8.5 bits

int4, int8, mxfp4 and nvfp4 hold the numbers of GGUF blocks (Q4_1, Q8_0, ggml's MXFP4 and an NVFP4 block of
deskpod's own): they are interleaved into those blocks at load (gguf_blocks) and run on the engine's GGUF
kernels (deskpod.quant.ggml: activations rounded to int8 per 32, integer multiply-adds), as a GGUF does.

FP8 has kernels of its own (float products). At load, rows are zero-padded to whole units of 32 inputs (only
when `in` is ragged); nothing is widened. Up to MATVEC_MAX_ROWS rows of x (decoding) the kernels decode each
unit of weights in registers and apply it to up to 8 rows at once: on CPUs with AVX512-BF16 and VBMI the codes
become bfloat16 through byte tables and meet activations rounded to bfloat16 in vdpbf16ps (such a build rounds
the activations so in every path: `fp8_activations_bf16`), elsewhere float32 FMAs (AVX2). Beyond that (prefill,
large batches) the weight is expanded a tile of rows at a time for PyTorch's GEMM (in bfloat16 on AMX CPUs:
deskpod.quant.ggml), whose cost then dominates. benchmarks/quant_kernels.py measures both against F.linear on the
expanded float32 weight and against the engine's kernels over GGUF's Q4_0 / Q8_0 blocks (deskpod.quant.ggml).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from deskpod.quant.ggml import BlockWeight, gemm_dtype, int8_rounded, tiled_gemm
from deskpod.quant.kernels import ggml_blocks, lowbit_cpu

# Up to this many rows of x FP8's matvec kernels (each unit decoded once per 8 rows, AVX2 FMAs) beat expanding
# the weight to float32 for PyTorch's GEMM; from about 24 rows on the GEMM wins (benchmarks/quant_kernels.py
# --crossover: with 1 and 2 threads, for SmolLM2's 576x1536 and 1536x576 matrices, the crossover is 20-28 rows).
MATVEC_MAX_ROWS = 20
# the schemes whose kernels round activations to int8 per 32 (the GGUF kernels'): the rest take them as floats
INT8_ACTIVATIONS = ("int4", "int8", "nvfp4", "mxfp4")
FP8_SCHEMES = ("fp8", "fp8_e5m2")


def fp8_activations_bf16() -> bool:
    """Whether this machine's FP8 kernels multiply activations rounded to bfloat16 (AVX512-BF16 builds)."""
    kernels = lowbit_cpu()
    return kernels is not None and kernels.activations_bf16()


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
        dtype = gemm_dtype()
        return tiled_gemm(x.to(dtype), lambda n0, n1: self._expand(n0, n1).to(dtype), self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] these kernels compute with."""
        return self._expand(0, self.out_features)[:, : self.in_features]

    def _matmul(self, x: torch.Tensor, portable: bool = False) -> torch.Tensor:
        """x [M, padded_in] -> [M, out] on the matvec kernels (portable: their scalar version)."""
        raise NotImplementedError

    def _expand(self, n0: int, n1: int, portable: bool = False) -> torch.Tensor:
        """Rows n0..n1 of the weight as float32: [n1 - n0, padded_in]."""
        raise NotImplementedError


class FP8Weights(CPUWeights):
    """FP8 E4M3 / E5M2: one byte per weight and a float32 scale per output row, as stored."""

    def __init__(self, qt, e5m2: bool):
        super().__init__(*qt.shape)
        self.e5m2 = e5m2
        self.register_buffer("codes", _pad_columns(qt.data["weight"].view(torch.uint8), self.padded_in))  # [N, K]
        self.register_buffer("row_scales", qt.data["weight_scale"].float().contiguous())  # [N]

    def _matmul(self, x: torch.Tensor, portable: bool = False) -> torch.Tensor:
        return lowbit_cpu().fp8_matmul(x, self.codes, self.row_scales, self.e5m2, portable=portable)

    def _tiled_gemm(self, x: torch.Tensor) -> torch.Tensor:
        # the activations the matvec kernels multiply, so that a row's output does not depend on its batch
        return super()._tiled_gemm(kernel_activations("fp8", x))

    def _expand(self, n0: int, n1: int, portable: bool = False) -> torch.Tensor:
        return lowbit_cpu().fp8_dequantize(self.codes[n0:n1], self.row_scales[n0:n1], self.e5m2, portable=portable)


def gguf_blocks(qt) -> BlockWeight | None:
    """The weight interleaved into the blocks of the engine's GGUF kernels (deskpod.quant.ggml), which hold the
    same numbers in the same bytes: int4 and int8 are GGUF's Q4_1 and Q8_0 (a float16 scale, for int4 a float16
    minimum too, per 32 weights), mxfp4 ggml's MXFP4, nvfp4 deskpod's NVFP4 block (its two E4M3 scales per 32, the
    per-tensor scale kept beside). There activations rounded to int8 per 32 meet the codes (E2M1's doubled
    values are small integers) in integer multiply-adds, as the engine runs a GGUF. A ragged last block is
    padded with zero codes and scales. None for fp8, or where the GGUF kernels are not built."""
    if qt.scheme not in INT8_ACTIVATIONS or ggml_blocks() is None:
        return None
    rows, units = qt.shape[0], -(-qt.shape[1] // 32)

    def scale_bytes(name: str, per_unit: int) -> torch.Tensor:  # each unit's scales as bytes: [rows, units, n]
        raw = _pad_columns(qt.data[name].contiguous().view(torch.uint8), units * per_unit)
        return raw.view(rows, units, per_unit)

    codes4 = _unit_order(qt.data["weight"], units * 32).view(rows, units, 16) if qt.scheme != "int8" else None
    scale = 1.0
    if qt.scheme == "int4":  # Q4_1: scale d, minimum m (float16), 16 bytes of codes in unit order; w = d q + m
        parts, block = [scale_bytes("weight_scale", 2), scale_bytes("weight_min", 2), codes4], "Q4_1"
    elif qt.scheme == "int8":  # Q8_0: scale d (float16), 32 int8 codes; w = d q
        codes = _pad_columns(qt.data["weight"].view(torch.uint8), units * 32).view(rows, units, 32)
        parts, block = [scale_bytes("weight_scale", 2), codes], "Q8_0"
    elif qt.scheme == "mxfp4":  # MXFP4: E8M0 scale, 16 bytes of codes
        parts, block = [scale_bytes("weight_scale", 1), codes4], "MXFP4"
    else:  # NVFP4: E4M3 scales of elements 0-15 and 16-31, 16 bytes of codes
        parts, block, scale = [scale_bytes("weight_scale", 2), codes4], "NVFP4", float(qt.data["weight_scale_2"])
    return BlockWeight(block, torch.cat(parts, dim=-1).view(rows, -1), units * 32, scale)


class GGUFBlockWeights(CPUWeights):
    """int4, int8, mxfp4, nvfp4 on the GGUF kernels (gguf_blocks) behind this module's interface: x padded to
    whole blocks. The engine holds the block weight itself where no padding is needed."""

    def __init__(self, qt):
        super().__init__(*qt.shape)
        self.weight = gguf_blocks(qt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.padded_in:
            return self.weight.apply(x)
        x2 = _pad_columns(x.reshape(-1, self.in_features), self.padded_in)
        return self.weight.apply(x2).view(*x.shape[:-1], self.out_features)

    def _matmul(self, x: torch.Tensor, portable: bool = False) -> torch.Tensor:
        return self.weight.matmul(x, portable)

    def _expand(self, n0: int, n1: int, portable: bool = False) -> torch.Tensor:
        return self.weight.rows(torch.arange(n0, n1), portable=portable)


def _e4m3_has_nan(qt) -> bool:
    # The in-register E4M3 decoding reads every code as finite; E4M3FN's NaN (S.1111.111) is never written by
    # quantize, and a tensor holding one is left to the reference path, which propagates it.
    return bool(((qt.data["weight"].view(torch.uint8) & 0x7F) == 0x7F).any())


# scheme -> builder; a builder returns None when its kernel cannot take this tensor.
KERNELS: dict[str, Callable[..., CPUWeights | None]] = {
    "nvfp4": GGUFBlockWeights,
    "mxfp4": GGUFBlockWeights,
    "fp8": lambda qt: None if _e4m3_has_nan(qt) else FP8Weights(qt, e5m2=False),
    "fp8_e5m2": lambda qt: FP8Weights(qt, e5m2=True),
    "int4": GGUFBlockWeights,
    "int8": GGUFBlockWeights,
}


def kernel_activations(scheme: str, x: torch.Tensor) -> torch.Tensor:
    """x [..., in] as the scheme's CPU kernels multiply it: rounded to int8 per 32 (blocks counted from each row's
    start; a ragged last block rounds its own values) for int4, int8, nvfp4 and mxfp4; rounded to bfloat16 for
    fp8 where fp8_activations_bf16(); else x itself."""
    if scheme in FP8_SCHEMES and fp8_activations_bf16():
        return x.to(torch.bfloat16).to(x.dtype)
    if scheme not in INT8_ACTIVATIONS:
        return x
    padded = F.pad(x, (0, -x.shape[-1] % 32))
    return int8_rounded(padded.reshape(-1, padded.shape[-1])).view(padded.shape)[..., : x.shape[-1]]


def cpu_weights(qt) -> CPUWeights | None:
    """A kernel-backed module for this QuantizedTensor on the CPU, or None: no kernel for its scheme, the
    kernels could not be built here (or DESKPOD_NO_KERNELS is set), or its tensors are not on the CPU."""
    build = KERNELS.get(qt.scheme)
    kernels = ggml_blocks() if qt.scheme in INT8_ACTIVATIONS else lowbit_cpu()
    if build is None or kernels is None or any(t.device.type != "cpu" for t in qt.data.values()):
        return None
    return build(qt)
