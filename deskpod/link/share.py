"""Which part of a model each linked box holds.

Pipeline parallel gives each box a contiguous run of layers, sized by the memory it reported (the first box
also holds the embedding, the last norm and the LM head — the head box samples, so it keeps them). Tensor
parallel gives each box a contiguous run of KV heads (with their query heads) and of the MLP's columns in
every layer: the projections into a layer are split by rows, the projections out of it by columns, and the
boxes' partial outputs are summed (one exchange after attention, one after the MLP).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, replace

import numpy as np

from deskpod.errors import UnsupportedModel
from deskpod.formats.spec import ModelSpec
from deskpod.formats.weights import BlockTensor, SchemeTensor, StoredTensor

LAYER = re.compile(r"blk\.(\d+)\.")  # a canonical tensor name's layer
HEAD_TENSORS = ("output_norm.", "output.")  # the final norm and LM head: on the box that samples


@dataclass(frozen=True)
class Share:
    """Box `rank` of `world`'s part of the model. Pipeline: layers [first_layer, end_layer). Tensor: KV heads
    [kv_start, kv_end) of the spec's and MLP columns [ffn_start, ffn_end) of every layer (and of every expert),
    and vocabulary rows [vocab_start, vocab_end) of the embedding and LM head."""

    rank: int
    world: int
    parallel: str
    first_layer: int
    end_layer: int
    kv_start: int = 0
    kv_end: int = 0
    ffn_start: int = 0
    ffn_end: int = 0
    vocab_start: int = 0  # tensor parallel: the rows of the embedding and LM head it holds
    vocab_end: int = 0

    @property
    def is_head(self) -> bool:
        return self.rank == 0

    @property
    def tensor(self) -> bool:
        return self.parallel == "tensor"

    @property
    def num_layers(self) -> int:
        return self.end_layer - self.first_layer

    def layers(self) -> range:
        return range(self.first_layer, self.end_layer)

    def heads(self, spec: ModelSpec) -> tuple[int, int]:
        """This box's query heads [start, end): those sharing its KV heads."""
        group = spec.num_heads // spec.num_kv_heads
        return self.kv_start * group, self.kv_end * group

    def owns(self, name: str) -> bool:
        """Whether this box loads (part of) the canonical tensor `name`."""
        layer = LAYER.match(name)
        if layer:
            return int(layer.group(1)) in self.layers()
        if self.tensor:  # every box holds its rows of the embedding and LM head, and the final norm
            return True
        if name.startswith(HEAD_TENSORS) or name.startswith("token_embd."):
            return self.is_head
        return True  # rope_freqs and other model-wide tables

    def describe(self, spec: ModelSpec) -> str:
        if self.tensor:
            h0, h1 = self.heads(spec)
            return (f"heads {h0}-{h1 - 1} (KV heads {self.kv_start}-{self.kv_end - 1}) and MLP columns "
                    f"{self.ffn_start}-{self.ffn_end - 1} of all {spec.num_layers} layers, vocabulary rows "
                    f"{self.vocab_start}-{self.vocab_end - 1}")
        return f"layers {self.first_layer}-{self.end_layer - 1} of {spec.num_layers}"


def pipeline_shares(spec: ModelSpec, layer_bytes: list[int], memory: list[int], fixed_head_bytes: int = 0) -> list[Share]:
    """Contiguous runs of layers, one per box, each box's weight bytes in proportion to its `memory` (the head
    box's `fixed_head_bytes` — embedding, LM head — counted in its share). Every box gets at least one layer."""
    world, total_layers = len(memory), spec.num_layers
    if total_layers < world:
        raise UnsupportedModel(f"a {total_layers}-layer model cannot be split over {world} boxes")
    total = sum(layer_bytes) + fixed_head_bytes
    targets = np.cumsum([total * m / sum(memory) for m in memory])  # where each box's run should end, in bytes
    ends, held, end = [], fixed_head_bytes, 0
    for box in range(world - 1):
        held, end = held + layer_bytes[end], end + 1  # at least one layer each
        last_allowed = total_layers - (world - 1 - box)  # and one left for each box after it
        while end < last_allowed and held + layer_bytes[end] / 2 <= targets[box]:
            held, end = held + layer_bytes[end], end + 1
        ends.append(end)
    ends.append(total_layers)
    starts = [0] + ends[:-1]
    return [Share(r, world, "pipeline", s, e) for r, (s, e) in enumerate(zip(starts, ends))]


def tensor_shares(spec: ModelSpec, world: int, qk_norm_whole: bool = False) -> list[Share]:
    """Even runs of KV heads and MLP columns (the first boxes take one more where they do not divide)."""
    if spec.num_kv_heads < world:
        raise UnsupportedModel(f"tensor parallel over {world} boxes needs at least {world} KV heads; this model has "
                               f"{spec.num_kv_heads}: use --parallel pipeline")
    if qk_norm_whole:
        raise UnsupportedModel("this model normalises the whole query projection across heads (OLMoE), which cannot "
                               "be split by heads: use --parallel pipeline")
    kv, cols, vocab = _runs(spec.num_kv_heads, world, 1), _runs(spec.intermediate_size, world, 256), _runs(spec.vocab_size, world, 1)
    return [Share(r, world, "tensor", 0, spec.num_layers, *kv[r], *cols[r], *vocab[r]) for r in range(world)]


def _runs(total: int, parts: int, unit: int) -> list[tuple[int, int]]:
    """[start, end) of `parts` near-equal runs of `total`, cut at multiples of the largest of `unit`, 32 or 1 that
    divides it into enough pieces (256 or 32 columns: a quantized block never straddles two boxes)."""
    step = next(u for u in (unit, 32, 1) if total % u == 0 and total // u >= parts)  # 1 always does
    units = total // step
    sizes = [units // parts + (i < units % parts) for i in range(parts)]
    bounds = [0, *itertools.accumulate(sizes)]
    return [(bounds[i] * step, bounds[i + 1] * step) for i in range(parts)]


# --- slices of stored tensors -------------------------------------------------------------------------


def take_rows(tensor: StoredTensor, start: int, end: int) -> StoredTensor:
    """Rows [start, end) of `tensor` (after any reordering it has), read lazily like the whole."""
    if (start, end) == (0, tensor.rows):
        return tensor
    stored = tensor.stored_rows or tensor.rows
    picked = replace(tensor.permute_rows(np.arange(start, end)), stored_rows=stored)
    fraction = (end - start) / tensor.rows
    return replace(picked, shape=(end - start, *tensor.shape[1:]), nbytes=math.ceil(tensor.nbytes * fraction))


def take_columns(tensor: StoredTensor, start: int, end: int) -> StoredTensor:
    """Columns [start, end) of a matrix: quantized blocks stay quantized when the cut falls between blocks."""
    columns = tensor.shape[1]
    if (start, end) == (0, columns):
        return tensor
    if isinstance(tensor, SchemeTensor):  # (its stored shape is its packed codes')
        raise UnsupportedModel(f"{tensor.file_name}: a {tensor.dtype} weight cannot be split by columns yet: "
                               "use --parallel pipeline")
    if isinstance(tensor, BlockTensor):
        from deskpod.quant.ggml import BLOCK_WEIGHTS

        block = BLOCK_WEIGHTS.get(tensor.dtype, 32)
        if start % block == 0 and end % block == 0:
            return BlockColumns(tensor.name, (tensor.rows, end - start), tensor.dtype,
                                tensor.nbytes * (end - start) // columns, base=tensor, start=start, end=end)
    return FloatColumns(tensor.name, (tensor.rows, end - start), "F32", tensor.rows * (end - start) * 4,
                        base=tensor, start=start, end=end)


@dataclass(frozen=True, eq=False, kw_only=True)
class _Columns:
    base: StoredTensor
    start: int
    end: int

    @property
    def file_name(self) -> str:
        return f"{self.base.file_name}[:, {self.start}:{self.end}]"


@dataclass(frozen=True, eq=False, kw_only=True)
class FloatColumns(_Columns, StoredTensor):
    """Columns of any tensor, as float32 (a cut inside a quantized block cannot stay quantized)."""

    def float(self):
        return self.base.float()[:, self.start:self.end].contiguous()


@dataclass(frozen=True, eq=False, kw_only=True)
class BlockColumns(_Columns, BlockTensor):
    """Columns of a ggml block tensor cut between blocks: each row's bytes of those blocks."""

    def float(self):
        return self.base.float()[:, self.start:self.end].contiguous()

    def blocks(self) -> np.ndarray:
        rows = np.asarray(self.base.blocks()).reshape(self.base.rows, -1)
        per_element = rows.shape[1] / self.base.shape[1]
        return rows[:, int(self.start * per_element):int(self.end * per_element)]
