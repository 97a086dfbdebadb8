"""Weight formats over ggml's block-quantized types, and the conversion from GGUF's raw blocks.

The layout of each ggml block type is read once at load time into two forms the kernels use
(see kernels/ggml_cpu.cpp): u4 (4-bit codes + float scale and min per 32) and i8 (int8 codes + float
scale per 32). Types with no compact form here are expanded to float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from deskpod.formats.weights import BlockTensor, StoredTensor
from deskpod.quant.kernels import ggml_cpu
from deskpod.quant.linear import LinearWeight

GROUP = 32
# Up to this many rows of activations (a decode batch), the kernels expand each weight group once and
# apply it to every row; beyond it (prefill), expanding the matrix once for a float GEMM is cheaper.
MATVEC_MAX_ROWS = 64


def _blocks(raw: np.ndarray, rows: int, block_bytes: int) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.uint8).reshape(rows, -1, block_bytes)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[..., start : start + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def u4_from_q4_0(raw: np.ndarray, shape: tuple[int, int]):
    """Q4_0 block: f16 d, 16 bytes of nibbles; w = d * (q - 8)."""
    b = _blocks(raw, shape[0], 18)
    d = _f16(b, 0)
    return b[..., 2:].reshape(shape[0], -1).copy(), d, -8.0 * d


def u4_from_q4_1(raw: np.ndarray, shape: tuple[int, int]):
    """Q4_1 block: f16 d, f16 m, 16 bytes of nibbles; w = d * q + m."""
    b = _blocks(raw, shape[0], 20)
    return b[..., 4:].reshape(shape[0], -1).copy(), _f16(b, 0), _f16(b, 2)


def u4_from_q4_k(raw: np.ndarray, shape: tuple[int, int]):
    """Q4_K super-block of 256: f16 d, f16 dmin, 12 bytes of 6-bit sub-scales and sub-mins, 128 bytes of
    nibbles; sub-block j holds w = d * sc[j] * q - dmin * m[j]. Every sub-block is one u4 group of 32."""
    b = _blocks(raw, shape[0], 144)
    d, dmin = _f16(b, 0)[..., None], _f16(b, 2)[..., None]
    s = b[..., 4:16].astype(np.uint8)
    low6 = np.uint8(63)
    sc = np.concatenate([s[..., 0:4] & low6, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([s[..., 4:8] & low6, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    # each 32-byte chunk c holds sub-block 2c in its low nibbles and 2c+1 in its high nibbles
    qs = b[..., 16:].reshape(*b.shape[:2], 4, 1, 32)
    values = np.concatenate([qs & 0xF, qs >> 4], axis=-2).reshape(shape[0], -1, 32)  # [N, groups, 32]
    codes = values[..., :16] | (values[..., 16:] << 4)  # deskpod's u4 group: low nibbles 0..15, high 16..31
    scales = (d * sc.astype(np.float32)).reshape(shape[0], -1)
    mins = -(dmin * mn.astype(np.float32)).reshape(shape[0], -1)
    return codes.reshape(shape[0], -1).astype(np.uint8), scales, mins


def i8_from_q8_0(raw: np.ndarray, shape: tuple[int, int]):
    """Q8_0 block: f16 d, 32 int8; w = d * q."""
    b = _blocks(raw, shape[0], 34)
    return b[..., 2:].reshape(shape[0], -1).copy().view(np.int8), _f16(b, 0)


U4_READERS = {"Q4_0": u4_from_q4_0, "Q4_1": u4_from_q4_1, "Q4_K": u4_from_q4_k}
I8_READERS = {"Q8_0": i8_from_q8_0}


class U4Weight(LinearWeight):
    """W = scale * q + min per group of 32 along the input dimension."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = codes.shape[0], codes.shape[1] * 2
        self.register_buffer("codes", codes)  # [N, K/2] uint8
        self.register_buffer("scales", scales)  # [N, K/32] float32
        self.register_buffer("mins", mins)  # [N, K/32] float32

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        kernels = ggml_cpu()
        x2 = x.reshape(-1, self.in_features).contiguous()
        if x2.shape[0] <= MATVEC_MAX_ROWS:
            y = kernels.u4_matmul(x2, self.codes, self.scales, self.mins)
        else:
            y = F.linear(x2, kernels.u4_dequantize(self.codes, self.scales, self.mins))
        return y.view(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        return ggml_cpu().u4_dequantize(self.codes, self.scales, self.mins)


class I8Weight(LinearWeight):
    """W = scale * q per group of 32; also serves as a (tied) embedding table."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes)  # [N, K] int8
        self.register_buffer("scales", scales)  # [N, K/32] float32

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        kernels = ggml_cpu()
        x2 = x.reshape(-1, self.in_features).contiguous()
        if x2.shape[0] <= MATVEC_MAX_ROWS:
            y = kernels.i8_matmul(x2, self.codes, self.scales)
        else:
            y = F.linear(x2, kernels.i8_dequantize(self.codes, self.scales))
        return y.view(*x.shape[:-1], self.out_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """W[ids] as float32: the embedding lookup. ids: [T] -> [T, K]"""
        codes = self.codes[ids].float().view(len(ids), -1, GROUP)
        return (codes * self.scales[ids].unsqueeze(-1)).view(len(ids), self.in_features)

    def dequantize(self) -> torch.Tensor:
        return ggml_cpu().i8_dequantize(self.codes, self.scales)


# Bytes per weight in each compact form: codes plus float32 scales (and mins) per group of 32.
BYTES_PER_WEIGHT = {"u4": 0.5 + 8 / GROUP, "i8": 1 + 4 / GROUP}
FORMS = {"u4": (U4_READERS, U4Weight), "i8": (I8_READERS, I8Weight)}


def compact_form(ggml_type: str, shape: tuple[int, ...]) -> str | None:
    """"u4" or "i8" when a matrix of this block type runs on the kernels here, else None (float32)."""
    if ggml_cpu() is None or len(shape) != 2 or shape[1] % GROUP:
        return None
    return next((form for form, (readers, _) in FORMS.items() if ggml_type in readers), None)


def compact_bytes(tensor: StoredTensor) -> int | None:
    """Resident bytes of `tensor` in its compact form; None when it has none here (it is expanded instead)."""
    form = compact_form(tensor.dtype, tensor.shape)
    return None if form is None else int(tensor.n_elements * BYTES_PER_WEIGHT[form])


def compact_linear(ggml_type: str, raw: np.ndarray, shape: tuple[int, int]) -> LinearWeight | None:
    """A kernel-backed weight for blocks of one type, [rows, bytes per row]; None when it has no compact form."""
    form = compact_form(ggml_type, shape)
    if form is None:
        return None
    readers, weight_class = FORMS[form]
    return weight_class(*(torch.from_numpy(a) for a in readers[ggml_type](raw, shape)))


def compact_weight(tensors: Sequence[StoredTensor]) -> LinearWeight | None:
    """The tensors' rows stacked into one kernel-backed weight, or None when there is no compact form that
    holds them all (a type without kernels here, ragged rows, or types of different forms)."""
    forms = {compact_form(t.dtype, t.shape) if isinstance(t, BlockTensor) else None for t in tensors}
    if len(forms) != 1 or None in forms:
        return None
    readers, weight_class = FORMS[forms.pop()]
    arrays = [readers[t.dtype](t.blocks(), t.shape) for t in tensors]
    return weight_class(*(torch.from_numpy(np.concatenate(parts)) for parts in zip(*arrays)))
