"""The layers every architecture is assembled from: norms, rotary embeddings, attention with its options,
gated MLPs, blocks and the decoder around them. An architecture's file picks and arranges them
(deskpod.engine.models.<arch>); the layers know nothing of formats or files.

Reads top to bottom in dependency order. Shapes: T tokens in a forward pass (every scheduled sequence's
tokens back to back), H query heads, KV key/value heads, D head_dim.

Queries and keys rotate in adjacent pairs (x0, x1), (x2, x3), ... of each head: the builder permutes the
q/k rows of the canonical (rotate-half) weights into that order at load, so one complex multiply applies
RoPE. The permutation is the same for queries and keys, so their dot products — all attention reads of
them — are unchanged.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deskpod.engine.attention import (AttentionBatch, PagedKVCache, cpu_kernels_for, decode_attention,
                                      prefill_attention, store_kv)
from deskpod.formats.spec import ModelSpec, RopeSpec
from deskpod.quant.ggml import MATVEC_MAX_ROWS, float32_gemm
from deskpod.quant.kernels import cpu_ops
from deskpod.quant.linear import Linear


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension (the weight is the factor itself: Gemma's 1 + w included)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = cpu_ops() if x.device.type == "cpu" and x.dtype == torch.float32 else None
        if kernels is not None:  # one fused pass instead of PyTorch's chain of small ops
            return kernels.rms_norm(x.contiguous(), self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


# --- rotary position embedding ------------------------------------------------------------------------


def pair_order(rows: int, heads: int) -> np.ndarray:
    """Row order taking each head's rows from rotate-half order to adjacent pairs (llama.cpp's `permute`):
    output rows 2j and 2j+1 of a head are its rows j and j + D/2."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)


def _default(inv: torch.Tensor, rope: RopeSpec, max_context: int) -> tuple[torch.Tensor, float]:
    # also "dynamic": transformers rescales only past max_position_embeddings, which the engine's context never is
    return inv, 1.0


def _linear(inv: torch.Tensor, rope: RopeSpec, max_context: int) -> tuple[torch.Tensor, float]:
    return inv / rope.factor, 1.0


def _llama3(inv: torch.Tensor, rope: RopeSpec, max_context: int) -> tuple[torch.Tensor, float]:
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between."""
    old = rope.original_context or max_context
    low, high = old / rope.low_freq_factor, old / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low, inv / rope.factor, inv)
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    return torch.where((wavelen >= high) & (wavelen <= low), blended, scaled), 1.0


def _yarn(inv: torch.Tensor, rope: RopeSpec, max_context: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate the slow dimensions, extrapolate the fast ones, ramp between; cos and sin scaled."""
    dim, old = 2 * len(inv), rope.original_context or max_context

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001), 0, 1)
    extrapolate = 1 - ramp
    inv = inv / rope.factor * (1 - extrapolate) + inv * extrapolate
    return inv, rope.attention_factor if rope.attention_factor is not None else _yarn_mscale(rope)


def _yarn_mscale(rope: RopeSpec) -> float:
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.mscale and rope.mscale_all_dim:
        return mscale(rope.factor, rope.mscale) / mscale(rope.factor, rope.mscale_all_dim)
    return mscale(rope.factor)


# rope kind -> (inverse frequencies, spec, the model's trained context: what transformers falls back on when a
# scaling names no original context) -> (scaled inverse frequencies, factor on cos and sin)
ROPE_SCALINGS: dict[str, Callable[[torch.Tensor, RopeSpec, int], tuple[torch.Tensor, float]]] = {
    "default": _default, "dynamic": _default, "linear": _linear, "llama3": _llama3, "yarn": _yarn,
}


class Rotary(nn.Module):
    """One RoPE variant's inverse frequencies [D/2] (float32, computed as transformers computes them);
    `select` turns this pass's positions into rotations e^{i·pos·freq}. Computed per pass rather than kept
    as a table: a table for a 128k context would hold hundreds of MB, the few positions of a pass cost
    microseconds."""

    def __init__(self, rope: RopeSpec, head_dim: int, max_context: int, freq_factors: torch.Tensor | None = None):
        super().__init__()
        inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if freq_factors is not None:  # a GGUF's rope_freqs: llama.cpp's precomputed divisors (Llama 3.1)
            inv, magnitude = inv / freq_factors, 1.0
        else:
            inv, magnitude = ROPE_SCALINGS[rope.kind](inv, rope, max_context)
        self.register_buffer("inv_freq", inv.float(), persistent=False)  # [D/2]
        self.magnitude = magnitude  # YaRN scales cos and sin

    def select(self, positions: torch.Tensor) -> torch.Tensor:
        angles = positions.to(self.inv_freq.device, torch.float32)[:, None] * self.inv_freq[None, :]  # [T, D/2]
        return torch.polar(torch.full_like(angles, self.magnitude), angles).unsqueeze(1)  # [T, 1, D/2]

    @staticmethod
    def apply(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        # x: [T, heads, D] in pair order, rot: [T, 1, D/2]
        T, H, D = x.shape
        pairs = torch.view_as_complex(x.float().reshape(T, H, D // 2, 2))
        return torch.view_as_real(pairs * rot).view(T, H, D).to(x.dtype)


# --- attention ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionOptions:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float  # on q·k
    window: int = 0  # keys a query sees, itself included; 0 = all before it
    softcap: float = 0.0  # scores -> softcap · tanh(scores / softcap)


class Attention(nn.Module):
    """Grouped-query attention over the paged KV cache: fused q/k/v projection (biases optional), optional
    q/k RMSNorm before RoPE — per head (Qwen3, Gemma 3), or over the whole projection (OLMoE) when
    `norm_whole` —, a sliding window, logit softcapping."""

    def __init__(self, options: AttentionOptions, wqkv: Linear, wo: Linear, rotary: int,
                 q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None, norm_whole: bool = False,
                 sinks: torch.Tensor | None = None):
        super().__init__()
        self.options, self.wqkv, self.wo, self.rotary = options, wqkv, wo, rotary
        self.q_norm, self.k_norm, self.norm_whole = q_norm, k_norm, norm_whole
        self.register_buffer("sinks", sinks)  # gpt-oss: a logit per head in every softmax's denominator

    def forward(self, x: torch.Tensor, batch: AttentionBatch, rots: Sequence[torch.Tensor], kv) -> torch.Tensor:
        # x: [T, hidden]; queries and keys are rotated together: they sit side by side in wqkv's output
        o = self.options
        T, H, KV, D = x.shape[0], o.num_heads, o.num_kv_heads, o.head_dim
        qkv = self.wqkv(x).view(T, H + 2 * KV, D)
        qk = qkv[:, : H + KV]
        if self.q_norm is not None and self.norm_whole:
            q = self.q_norm(qk[:, :H].reshape(T, H * D)).view(T, H, D)
            qk = torch.cat([q, self.k_norm(qk[:, H:].reshape(T, KV * D)).view(T, KV, D)], dim=1)
        elif self.q_norm is not None:
            qk = self.head_norms(qk, H)
        k_cache, v_cache = kv
        kernels = cpu_kernels_for(qk, k_cache)
        if kernels is not None:  # rotated and stored in one pass instead of a dozen small ops
            q = kernels.rope_store(qk, qkv[:, H + KV :], torch.view_as_real(rots[self.rotary]), k_cache, v_cache,
                                   batch.slots, H)
        else:
            qk = Rotary.apply(qk, rots[self.rotary])
            store_kv(k_cache, v_cache, batch.slots, qk[:, H:], qkv[:, H + KV :])
            q = qk[:, :H]
        args = (k_cache, v_cache)
        sinks = self.sinks
        if batch.all_decode:
            out = decode_attention(q, *args, batch.decode_block_tables, batch.decode_context_lens, o.scale, o.window,
                                   o.softcap, sinks)
        else:
            out = torch.empty_like(q)
            if len(batch.decode_rows):
                out[batch.decode_rows] = decode_attention(
                    q[batch.decode_rows], *args, batch.decode_block_tables, batch.decode_context_lens, o.scale, o.window,
                    o.softcap, sinks,
                )
            for chunk in batch.prefills:
                out[chunk.rows] = prefill_attention(q[chunk.rows], *args, chunk, o.scale, o.window, o.softcap, sinks)
        return self.wo(out.reshape(T, H * D))

    def head_norms(self, qk: torch.Tensor, H: int) -> torch.Tensor:
        """qk [T, H + KV, D] with the queries' heads normed by q_norm and the keys' by k_norm."""
        q_norm, k_norm = self.q_norm, self.k_norm
        if qk.device.type == "cpu" and qk.dtype == torch.float32 and (kernels := cpu_ops()) is not None:
            return kernels.head_norms(qk, q_norm.weight, k_norm.weight, H, q_norm.eps, k_norm.eps)  # one call, no copies
        return torch.cat([q_norm(qk[:, :H].contiguous()), k_norm(qk[:, H:].contiguous())], dim=1)


# --- MLP, blocks, the decoder --------------------------------------------------------------------------

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's gated unit: both halves clamped, a sigmoid-weighted gate, and up shifted by one."""
    gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up fused into one projection; `swiglu` (alpha, limit): gpt-oss's
    clamped form instead."""

    def __init__(self, w_gate_up: Linear, w_down: Linear, intermediate: int, activation: str,
                 swiglu: tuple[float, float] | None = None):
        super().__init__()
        self.w_gate_up, self.w_down, self.intermediate = w_gate_up, w_down, intermediate
        self.act = None if swiglu else ACTIVATIONS[activation]
        self.swiglu = swiglu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).split(self.intermediate, dim=-1)
        return self.w_down(self.activate(gate, up))

    def activate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.swiglu is not None:
            return clamped_swiglu(gate, up, *self.swiglu)
        return self.act(gate) * up


class MoE(nn.Module):
    """Mixture-of-Experts: a router picks `top_k` of the experts (gated MLPs) for each token, and the token's
    output is their outputs weighted by the router's probabilities. Tokens are grouped by expert, so each
    chosen expert runs once over its tokens and an expert no token chose is never read — a decode step reads
    only top_k experts' weights per token."""

    def __init__(self, router: Linear, experts: list[MLP], top_k: int, norm_topk: bool):
        super().__init__()
        self.router, self.experts = router, nn.ModuleList(experts)
        self.top_k, self.norm_topk = top_k, norm_topk
        self._grouped: Callable | bool | None = None  # the GPU's one-launch experts, once built (False: none)
        self._block_experts: BlockExperts | bool | None = None  # the CPU's two-call experts (False: none)

    def block_experts(self) -> BlockExperts | None:
        """The experts two kernel calls at a time when they are all GGUF blocks (BlockExperts); None
        otherwise. Built once."""
        if self._block_experts is None:
            self._block_experts = BlockExperts.of(list(self.experts)) or False
        return self._block_experts or None

    def grouped(self) -> Callable | None:
        """The experts as one Triton launch per projection (deskpod.quant.kernels.triton_moe), when they are
        quantized alike and their weights are on the GPU; None otherwise. Built once."""
        if self._grouped is None:
            self._grouped = grouped_experts(list(self.experts)) or False
        return self._grouped or None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [tokens, top_k], experts [tokens, top_k]): softmax over every expert, the top k kept,
        renormalised when the model says so (in float32). Renormalised, that is the softmax of the top k logits
        (Mixtral's form): two operations a layer instead of four."""
        logits = self.router(x).float()
        if self.norm_topk:
            top, chosen = torch.topk(logits, self.top_k, dim=-1)
            return torch.softmax(top, dim=-1).to(x.dtype), chosen
        weights, chosen = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
        return weights.to(x.dtype), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen = self.route(x)
        if x.is_cuda and (grouped := self.grouped()) is not None:
            return grouped(x, weights, chosen).reshape(shape)
        if x.shape[0] == 1:  # one token (single-stream decode): its experts in turn, no grouping to do
            # in expert order and summed by index_add_, as the grouped path sums them: the sum must not depend on
            # the batch
            chosen, order = chosen[0].sort()
            experts = chosen.tolist()
            if x.dtype == torch.float32 and x.device.type == "cpu" and (blocks := self.block_experts()) is not None:
                rows = blocks(x, [(e, 0, row, 1) for row, e in enumerate(experts)], len(experts))
            else:
                rows = torch.cat([self.experts[expert](x) for expert in experts])
            scaled = rows * weights[0, order].unsqueeze(-1)
            return torch.zeros_like(x).index_add_(0, chosen.new_zeros(len(experts)), scaled).reshape(shape)
        flat = chosen.flatten()
        order = torch.argsort(flat, stable=True)
        tokens = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.top_k)[order]
        scale = weights.flatten()[order].unsqueeze(-1)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        out = torch.zeros_like(x)
        blocks = self.block_experts() if x.dtype == torch.float32 and x.device.type == "cpu" else None
        # a decode batch (measured: 8 streams 1.04x faster); a prefill's tokens gain nothing from it (0.97x)
        if blocks is not None and x.shape[0] <= MATVEC_MAX_ROWS:
            starts = itertools.accumulate(counts, initial=0)
            runs = [(e, s0, s0, n) for e, (s0, n) in enumerate(zip(starts, counts)) if n]
            out.index_add_(0, tokens, blocks(x[tokens], runs, len(tokens)) * scale)  # rows in expert order
            return out.reshape(shape)
        start = 0
        for expert, count in enumerate(counts):  # (index_add_ in expert order: the one-token path's order too)
            if count:
                mine = tokens[start:start + count]
                out.index_add_(0, mine, self.experts[expert](x[mine]) * scale[start:start + count])
                start += count
        return out.reshape(shape)


class BlockExperts:
    """A MoE layer's experts whose projections are GGUF blocks without biases, run two kernel calls at a time
    (deskpod.quant.ggml.multi_matmul): every chosen expert's gate and up over its rows, then every down. The
    products, activation and sums are the expert-by-expert path's, without its ~20 small operations per expert."""

    def __init__(self, gate_up: list[list[tuple[Any, int]]], down: list[Any], expert: MLP):
        self.gate_up, self.down = gate_up, down  # per expert: [(weight, first column)], its down weight
        self.width, self.hidden, self.activate = expert.intermediate, down[0].out_features, expert.activate

    @classmethod
    def of(cls, experts: list[MLP]) -> BlockExperts | None:
        from deskpod.quant.ggml import BlockWeight
        from deskpod.quant.linear import ConcatWeight

        def blocks(linear: Linear) -> list | None:
            weight = linear.weight
            parts = weight.parts if isinstance(weight, ConcatWeight) else [weight]
            plain = all(isinstance(p, BlockWeight) and p.scale == 1.0 for p in parts)  # multi_matmul scales nothing
            return list(parts) if linear.bias is None and plain else None

        gate_up, down = [blocks(e.w_gate_up) for e in experts], [blocks(e.w_down) for e in experts]
        if any(p is None for p in gate_up + down) or any(len(p) != 1 for p in down):
            return None
        placed = [[(w, sum(p.out_features for p in parts[:i])) for i, w in enumerate(parts)] for parts in gate_up]
        return cls(placed, [d[0] for d in down], experts[0])

    def __call__(self, x: torch.Tensor, runs: Sequence[tuple[int, int, int, int]], rows: int) -> torch.Tensor:
        """[rows, hidden]: for each run (expert, x row, output row, count), that expert over `count` rows of x
        from `x row`, written from `output row`."""
        from deskpod.quant.ggml import Placed, multi_matmul

        h = multi_matmul(x, [Placed(w, xr, r, n, col) for e, xr, r, n in runs for w, col in self.gate_up[e]],
                         rows, 2 * self.width)
        a = self.activate(*h.split(self.width, dim=-1))
        return multi_matmul(a, [Placed(self.down[e], r, r, n) for e, _, r, n in runs], rows, self.hidden)


def grouped_experts(experts: list[MLP]) -> Callable | None:
    """(x, weights, chosen) -> the experts' summed outputs in one Triton launch per projection, for experts whose
    weights are QuantizedTensors of one scheme held as buffers (on the GPU); None otherwise. Their tensors are
    stacked once and each expert's buffers become views of the stacks, so the weights are not held twice."""
    from deskpod.quant.linear import SchemeWeight, _triton

    pairs = [(e.w_gate_up, e.w_down) for e in experts]
    weights = [linear.weight for pair in pairs for linear in pair]
    if _triton() is None or not all(isinstance(w, SchemeWeight) and w.qt is not None for w in weights):
        return None
    from deskpod.quant.kernels import triton_moe

    biases = []
    for i in (0, 1):
        held = [pair[i].bias for pair in pairs]
        if any((b is None) != (held[0] is None) for b in held):
            return None
        biases.append(None if held[0] is None else torch.stack(held))
    try:
        stacks = [triton_moe.stack_experts([pair[i].weight.qt for pair in pairs]) for i in (0, 1)]
    except ValueError:  # experts in different schemes (or one without a kernel): the per-expert path
        return None
    for e, pair in enumerate(pairs):
        for stack, linear in zip(stacks, pair):
            for name in stack.data:
                linear.weight._buffers[name] = stack.data[name][e]
    activation = experts[0].activate

    def run(x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        return triton_moe.experts_forward(x, weights, chosen, stacks[0], stacks[1], activation, biases[0], biases[1])

    return run


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)); Gemma also norms each sub-layer's output ("sandwich").
    `reduce`: under tensor parallel each box computes part of the heads and MLP columns, and this sums the
    boxes' partial outputs of each sub-layer (before the post-norms, which need the whole)."""

    def __init__(self, attn_norm: RMSNorm, attn: Attention, mlp_norm: RMSNorm, mlp: MLP | MoE,
                 attn_post_norm: RMSNorm | None = None, mlp_post_norm: RMSNorm | None = None,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp
        self.attn_post_norm, self.mlp_post_norm = attn_post_norm, mlp_post_norm
        self.reduce = reduce

    def forward(self, x: torch.Tensor, batch: AttentionBatch, rots: Sequence[torch.Tensor], kv) -> torch.Tensor:
        h = self.attn(self.attn_norm(x), batch, rots, kv)
        h = h if self.reduce is None else self.reduce(h)
        x = x + (h if self.attn_post_norm is None else self.attn_post_norm(h))
        h = self.mlp(self.mlp_norm(x))
        h = h if self.reduce is None else self.reduce(h)
        return x + (h if self.mlp_post_norm is None else self.mlp_post_norm(h))


class DecoderLM(nn.Module):
    """Token embedding (scaled for Gemma), the blocks, a final norm, the LM head (often the embedding itself),
    optional final logit softcapping. A box linked to others may hold only some of these: its blocks are
    layers first_layer.. of the model, and table / norm / head are None where another box runs them."""

    def __init__(self, spec: ModelSpec, table: Linear | None, blocks: list[Block], norm: RMSNorm | None,
                 head: Linear | None, rotaries: list[Rotary], embed_scale: float = 1.0,
                 dtype: torch.dtype = torch.float32, first_layer: int = 0, vocab: tuple[int, int] | None = None,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """`vocab`: under tensor parallel, the rows [start, end) of the vocabulary this box's table and head
        hold; its embeddings are summed with the other boxes' (`reduce`), its logits are that slice."""
        super().__init__()
        self.spec, self.dtype, self.first_layer = spec, dtype, first_layer
        self.vocab, self.reduce = vocab, reduce
        self.table, self.head = table, head  # the same module when tied
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.rotaries = nn.ModuleList(rotaries)
        self.embed_scale, self.final_softcap = embed_scale, spec.final_softcap

    @property
    def kv_heads(self) -> int:
        """KV heads of this box's cache (all of the model's, or its tensor-parallel share)."""
        return self.blocks[0].attn.options.num_kv_heads

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.vocab is not None:  # this box's rows; zeros for the tokens another box holds, summed across boxes
            local = ids - self.vocab[0]
            mine = (local >= 0) & (local < self.vocab[1] - self.vocab[0])
            x = self.table.rows(torch.where(mine, local, 0)) * mine.unsqueeze(-1)
            x = self.reduce(x)
        else:
            x = self.table.rows(ids)  # [T, hidden] float32, whatever the table's format
        x = x * self.embed_scale if self.embed_scale != 1.0 else x
        return x.to(device=self.blocks[0].attn_norm.weight.device, dtype=self.dtype)

    @torch.inference_mode()
    def forward_batch(self, ids: torch.Tensor, batch: AttentionBatch, cache: PagedKVCache) -> torch.Tensor:
        """ids: [T], the tokens of every scheduled sequence back to back -> logits [len(logit_rows), vocab]."""
        return self.logits(self.run_blocks(self.embed(ids), batch, cache)[batch.logit_rows])

    # A step in two halves (ModelRunner.submit / collect): on one box the whole step runs in the first;
    # a pipeline's LinkedModel returns in between, while the other boxes work.
    def start_batch(self, ids: torch.Tensor, batch: AttentionBatch, cache: PagedKVCache) -> torch.Tensor:
        return self.forward_batch(ids, batch, cache)

    def finish_batch(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    @torch.inference_mode()
    def run_blocks(self, x: torch.Tensor, batch: AttentionBatch, cache: PagedKVCache) -> torch.Tensor:
        """This box's layers over hidden states x [T, hidden] (its cache holds those layers only)."""
        rots = [r.select(batch.positions) for r in self.rotaries]
        for block, kv in zip(self.blocks, cache.layers):
            x = block(x, batch, rots, kv)
        return x

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with float32_gemm():  # a bfloat16 GEMM's logits would tie
            logits = self.head(self.norm(x))
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, all_logits: bool = False):
        """One sequence: ids, positions [T] -> logits [T, vocab] (or [1, vocab] for the last token)."""
        batch = AttentionBatch.build([(len(ids), int(positions[0]), cache.block_table, True)], cache.block_size)
        if all_logits:
            batch = dataclasses.replace(batch, logit_rows=torch.arange(len(ids)))
        return self.forward_batch(ids, batch, cache)


class KVCache(PagedKVCache):
    """The paged cache laid out for one sequence of up to `max_len` tokens (blocks 0, 1, 2, ... in order)."""

    BLOCK_SIZE = 16

    def __init__(self, spec: ModelSpec, max_len: int, dtype=torch.float32, device="cpu"):
        blocks = -(-max_len // self.BLOCK_SIZE)
        super().__init__(spec.num_layers, spec.num_kv_heads, spec.head_dim, blocks, self.BLOCK_SIZE, dtype, device)
        self.block_table = list(range(blocks))
