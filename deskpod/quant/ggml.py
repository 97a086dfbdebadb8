"""GGUF's block-quantized weights kept exactly as stored, as a weight format (kernels/ggml_blocks.cpp).

Decoding (up to MATVEC_MAX_ROWS rows of activations) runs the integer kernels: activations quantized to int8
per block of 32 (llama.cpp's Q8_0 rounding, which llama.cpp itself uses for the 32-weight block types; for
K-quants it rounds per 256), meeting the stored blocks in integer multiply-adds. Beyond that (prefill) the
weight is expanded a tile of rows at a time for PyTorch's GEMM, whose cost then dominates:
- in bfloat16 where the CPU multiplies it in matrix tiles (AMX: oneDNN's GEMM there runs 4-7x its float32
  one), activations and weights each rounded once to bfloat16 (a relative 2^-8: closer to float32 than the
  integer kernels' int8 rounding of activations);
- else in float32, over the same int8-rounded activations as the integer kernels: both paths then compute the
  same products, so a row's result does not depend on how many rows share its step (beyond float rounding).
Types without a kernel here are expanded to float32 at load by the caller.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from deskpod.formats.weights import BlockTensor, StoredTensor
from deskpod.quant.kernels import ggml_blocks
from deskpod.quant.linear import LinearWeight
from deskpod.quant.pages import HUGE_PAGES, release_file_pages

# ggml's type ids of the block types the kernels run, by GGUF type name
GGML_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
# ... and the blocks deskpod.quant.cpu repacks its own schemes into: MXFP4 (ggml's layout: E8M0 scale, 16 bytes of
# E2M1 codes) and NVFP4 (deskpod's: two E4M3 scales, 16 bytes of codes; an id of its own, never read from a file)
BLOCK_TYPES = {**GGML_TYPES, "MXFP4": 39, "NVFP4": 1000}
# weights per block: a row is a whole number of blocks
BLOCK_WEIGHTS = {"Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
# Up to this many rows of activations (a decode batch) the integer kernels decode each block once for all rows;
# beyond it (prefill), expanding tiles of the weight for a float GEMM is cheaper.
MATVEC_MAX_ROWS = 64
# Weights expanded per tile in the prefill path: enough rows for an efficient GEMM, small enough to stay in
# cache and never to hold a large matrix (a 262144 x 640 token table) expanded at once.
GEMM_TILE = 1 << 20
# Bytes of a weight copied at a time when it is loaded (then the file's pages under them are released)
COPY_BYTES = 16 << 20


def _gemm_dtype() -> torch.dtype:
    """The prefill GEMM's type: bfloat16 where the CPU has AMX-BF16 tiles (elsewhere oneDNN emulates it, slower
    than float32); DESKPOD_CPU_GEMM=float32 or bfloat16 overrides (to compare the two, or to rule out one)."""
    chosen = os.environ.get("DESKPOD_CPU_GEMM", "auto")
    if chosen not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"DESKPOD_CPU_GEMM={chosen!r}: expected auto, float32 or bfloat16")
    if chosen == "auto":
        chosen = "bfloat16" if torch.cpu.get_capabilities().get("amx_bf16") else "float32"
    return getattr(torch, chosen)


GEMM_DTYPE = _gemm_dtype()
_FLOAT32_GEMM: ContextVar[bool] = ContextVar("float32_gemm", default=False)


def gemm_dtype() -> torch.dtype:
    return torch.float32 if _FLOAT32_GEMM.get() else GEMM_DTYPE


@contextmanager
def float32_gemm() -> Iterator[None]:
    """The GEMMs within in float32: the output head's (logits rounded to bfloat16's 8 significant bits tie, and
    sampling, logprobs and speculative decoding's checks compare them)."""
    token = _FLOAT32_GEMM.set(True)
    try:
        yield
    finally:
        _FLOAT32_GEMM.reset(token)


def tiled_gemm(x: torch.Tensor, expand: Callable[[int, int], torch.Tensor], out_features: int) -> torch.Tensor:
    """x [M, K] @ W.T as float32 [M, out_features], W's rows n0..n1 expanded by `expand(n0, n1)` (in x's type)
    one tile at a time."""
    out = torch.empty(len(x), out_features)
    step = max(1, GEMM_TILE // x.shape[1])
    for n0 in range(0, out_features, step):
        n1 = min(n0 + step, out_features)
        out[:, n0:n1] = F.linear(x, expand(n0, n1))
    return out


# Types whose rows the SIMD kernels take regrouped eight at a time (the same bits, reordered once at load), so that
# one pass of a block column yields eight outputs: their matrix-vector products run 2-3x faster (ggml_blocks.cpp,
# "Interleaved").
INTERLEAVED = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4", "NVFP4"}
INTERLEAVED_ROWS = 8


class BlockWeight(LinearWeight):
    """A weight [N, K] of GGUF's blocks: N rows of blocks of one type; also serves as a token table. `scale`
    multiplies every weight (NVFP4's per-tensor scale; 1 for GGUF's own types). `blocks` come as the file holds
    them; INTERLEAVED types whose rows come in whole groups are held interleaved (interleave=False: never)."""

    def __init__(self, ggml_type: str, blocks: torch.Tensor | np.ndarray, in_features: int, scale: float = 1.0,
                 interleave: bool = True):
        super().__init__()
        self.ggml_type, self.type_id = ggml_type, BLOCK_TYPES[ggml_type]
        self.out_features, self.in_features, self.scale = blocks.shape[0], in_features, scale
        # (the plain-loop kernels, where the SIMD ones are not built, would only have to undo it row by row)
        self.interleaved = (interleave and ggml_type in INTERLEAVED and len(blocks) % INTERLEAVED_ROWS == 0
                            and ggml_blocks().simd())
        self.register_buffer("blocks", self._held(blocks))  # [N, bytes per row] uint8
        if self.interleaved:
            self.type_id += ggml_blocks().X8

    def _held(self, blocks: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The blocks copied into huge pages (the file's bytes stay as they are): these are the bytes decoding
        streams, and in 4 KB pages every 4 KB of them costs a TLB miss (deskpod.quant.pages). A few MB at a time,
        each part of a mapped file released once copied, so that loading never holds a weight twice."""
        held = HUGE_PAGES.take(blocks.shape[0] * blocks.shape[1]).view(tuple(blocks.shape))
        step = max(1, COPY_BYTES // max(1, blocks.shape[1]) // INTERLEAVED_ROWS) * INTERLEAVED_ROWS
        for r0 in range(0, len(blocks), step):
            part = blocks[r0 : r0 + step]
            rows = _tensor_of(np.ascontiguousarray(part)) if isinstance(part, np.ndarray) else part.contiguous()
            if self.interleaved:
                ggml_blocks().interleave(rows, self.type_id, out=held[r0 : r0 + step])
            else:
                held[r0 : r0 + step].copy_(rows)
            if isinstance(part, np.ndarray):
                release_file_pages(part)
        return held

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N]
        if x.dim() == 2 and len(x) <= MATVEC_MAX_ROWS and x.dtype == torch.float32 and x.is_contiguous():
            # a decode step's rows, as they come: no reshapes or casts (each a dispatcher call, ~120 a step)
            return ggml_blocks().matmul(x, self.blocks, self.type_id, scale=self.scale)
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        y = self.matmul(x2) if len(x2) <= MATVEC_MAX_ROWS else self._tiled_gemm(x2)  # both scale the rows
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def matmul(self, x: torch.Tensor, portable: bool = False) -> torch.Tensor:
        """x [M, K] float32 contiguous @ W.T on the integer kernels (portable: their plain-loop version)."""
        return ggml_blocks().matmul(x, self.blocks, self.type_id, portable=portable, scale=self.scale)

    def _tiled_gemm(self, x: torch.Tensor) -> torch.Tensor:
        bfloat16 = gemm_dtype() == torch.bfloat16
        # in float32, the integer kernels' int8-rounded activations: the same products whichever path a row takes
        x = x.bfloat16() if bfloat16 else int8_rounded(x)
        return tiled_gemm(x, lambda n0, n1: self.rows(torch.arange(n0, n1), bfloat16), self.out_features)

    def rows(self, ids: torch.Tensor, bfloat16: bool = False, portable: bool = False) -> torch.Tensor:
        """The weights of rows `ids` as float32 (bfloat16: each rounded once; portable: the plain loops)."""
        return ggml_blocks().dequantize_rows(self.blocks, self.type_id, self.in_features, ids.long().cpu(),
                                             portable=portable, scale=self.scale, bfloat16=bfloat16)

    def dequantize(self) -> torch.Tensor:
        return self.rows(torch.arange(self.out_features))

    def file_blocks(self) -> torch.Tensor:
        """The blocks in the file's layout: row after row."""
        if not self.interleaved:
            return self.blocks
        return ggml_blocks().interleave(self.blocks, BLOCK_TYPES[self.ggml_type], to_rows=True)

    def take_rows(self, ids: torch.Tensor) -> BlockWeight:
        return BlockWeight(self.ggml_type, self.file_blocks()[ids], self.in_features, self.scale)

    def extra_repr(self) -> str:
        layout = ", interleaved" if self.interleaved else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, type={self.ggml_type}{layout}"


def _tensor_of(array: np.ndarray) -> torch.Tensor:
    """A tensor over the array's memory, only read: a file's read-only mapping too (torch warns of those)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


@dataclass(frozen=True)
class Placed:
    """A weight's work in multi_matmul: rows x_row.. of x (count of them) times its rows, written at out_row..
    and columns col.. of the output."""

    weight: BlockWeight
    x_row: int
    out_row: int
    count: int
    col: int = 0


def multi_matmul(x: torch.Tensor, work: Sequence[Placed], out_rows: int, width: int) -> torch.Tensor:
    """[out_rows, width] holding each weight's product where `work` places it, in one kernel call (a MoE
    layer's experts); each product exactly as BlockWeight.apply computes it for those rows alone (up to
    MATVEC_MAX_ROWS: beyond, apply expands tiles for a float GEMM)."""
    return ggml_blocks().multi_matmul(
        x.float().contiguous(), [p.weight.blocks for p in work], [p.weight.type_id for p in work],
        [p.x_row for p in work], [p.out_row for p in work], [p.count for p in work], [p.col for p in work],
        out_rows, width)


def int8_rounded(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] rounded as the kernels round activations: to int8 per block of 32, scale max|x| / 127, in
    float32 with the same operations (round half to even of x * (1 / scale)), back to float."""
    blocks = x.view(len(x), -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(scale > 0, 1 / scale, 0)
    return (torch.round(blocks * inverse) * scale).view_as(x)


def has_kernel(ggml_type: str, shape: tuple[int, ...]) -> bool:
    """Whether a matrix of this type and shape runs on the kernels here (else it is expanded to float32)."""
    block = BLOCK_WEIGHTS.get(ggml_type, 32)
    return ggml_type in GGML_TYPES and len(shape) == 2 and shape[1] % block == 0 and ggml_blocks() is not None


def compact_bytes(tensor: StoredTensor) -> int | None:
    """Resident bytes of `tensor` kept as stored; None when it has no kernel here (it is expanded instead)."""
    return tensor.nbytes if has_kernel(tensor.dtype, tensor.shape) else None


def compact_weight(tensors: Sequence[StoredTensor]) -> LinearWeight | None:
    """The tensors' rows stacked into one kernel-backed weight, or None when they are not all of one block type
    with a kernel here."""
    if not all(isinstance(t, BlockTensor) for t in tensors) or len({t.dtype for t in tensors}) != 1:
        return None
    first = tensors[0]
    if not all(has_kernel(t.dtype, t.shape) for t in tensors) or len({t.shape[1] for t in tensors}) != 1:
        return None
    parts = [np.asarray(t.blocks()).reshape(t.rows, -1) for t in tensors]
    if len(parts) == 1:  # its bytes as read: BlockWeight copies them, releasing the file's pages as it goes
        return BlockWeight(first.dtype, parts[0], first.shape[1])
    weight = BlockWeight(first.dtype, np.concatenate(parts), first.shape[1])
    for part in parts:  # copied: the file's pages need not count as this process's memory any more
        release_file_pages(part)
    return weight
