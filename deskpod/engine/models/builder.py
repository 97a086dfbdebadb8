"""ModelBuilder: reads a weight source into the shared layers. An architecture's `build(builder)` says which
layers and in what arrangement; the builder takes the tensors by canonical name, checks their shapes
against the spec, holds them in the format the options ask for, and puts q/k rows in pair order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from deskpod.engine.models.layers import (
    MLP,
    MoE,
    Attention,
    AttentionOptions,
    Block,
    DecoderLM,
    RMSNorm,
    Rotary,
    pair_order,
)
from deskpod.errors import CorruptModel, UnsupportedModel
from deskpod.formats.spec import SLIDING, RopeSpec
from deskpod.formats.weights import StoredTensor, WeightSource
from deskpod.quant.linear import Linear, WeightOptions, build_weight


class ModelBuilder:
    def __init__(self, source: WeightSource, options: WeightOptions):
        self.source, self.spec, self.options = source, source.spec, options
        self._rotaries: dict[RopeSpec, int] = {}
        self.rotaries: list[Rotary] = []

    # --- tensors -----------------------------------------------------------------------------------

    def linear(self, names: Sequence[str], shape: tuple[int, int], orders: Sequence[np.ndarray | None] = (),
               bias: bool | None = None) -> Linear:
        """One Linear over the `<name>.weight` tensors stacked, rows reordered by `orders` where given. Biases:
        `bias` True takes every `<name>.bias`, False none (a file that has them is then refused as holding unused
        tensors), None those present (zeros for the parts without one)."""
        orders = list(orders) or [None] * len(names)
        weights = [_reorder(self.source.take(f"{n}.weight"), o) for n, o in zip(names, orders)]
        take = {True: self.source.take, None: self.source.take_optional, False: lambda name: None}[bias]
        biases = [take(f"{n}.bias") for n in names]
        weight = build_weight(weights, shape, self.options)
        if not any(biases):
            return Linear(weight)
        parts = [self._vector(b, w.rows, o) if b is not None else torch.zeros(w.rows) for b, w, o in zip(biases, weights, orders)]
        return Linear(weight, torch.cat(parts).to(self.options.device, self.options.dtype))

    def vector(self, name: str, length: int, order: np.ndarray | None = None) -> torch.Tensor:
        """A 1-D tensor of `length` values (CorruptModel naming it when the file's has another shape)."""
        return self._vector(self.source.take(name), length, order).to(self.options.device, self.options.dtype)

    def _vector(self, tensor: StoredTensor, length: int, order: np.ndarray | None) -> torch.Tensor:
        if tensor.shape != (length,):
            raise CorruptModel(f"{self.source.label}: {tensor.file_name} is {list(tensor.shape)}; the model's config "
                               f"implies [{length}]")
        return _reorder(tensor, order).float()

    def norm(self, name: str, length: int | None = None, order: np.ndarray | None = None) -> RMSNorm:
        return RMSNorm(self.vector(f"{name}.weight", length or self.spec.hidden_size, order), self.spec.norm_eps)

    # --- layers ------------------------------------------------------------------------------------

    def rotary(self, rope: RopeSpec) -> int:
        """The index of the rotary tables for `rope` (one per distinct variant, shared by the layers using it)."""
        if rope not in self._rotaries:
            self._rotaries[rope] = len(self.rotaries)
            rotary = Rotary(rope, self.spec.head_dim, self.spec.max_context, self._freq_factors(rope))
            self.rotaries.append(rotary.to(self.options.device))
        return self._rotaries[rope]

    def _freq_factors(self, rope: RopeSpec) -> torch.Tensor | None:
        """A GGUF's rope_freqs (llama.cpp's Llama 3.1 scaling, precomputed), for the global layers' RoPE."""
        if rope != self.spec.rope or not self.source.has("rope_freqs.weight"):
            return None
        if rope.kind != "default":
            raise UnsupportedModel(f"{self.source.label}: rope_freqs and RoPE scaling {rope.kind!r} together")
        return self.vector("rope_freqs.weight", self.spec.head_dim // 2).float().cpu()

    def attention(self, i: int, qk_norm: bool | str = False) -> Attention:
        """Layer i's attention; `qk_norm`: True for an RMSNorm over each head's queries and keys, "whole" for
        one over the whole q and k projections (OLMoE)."""
        s, p = self.spec, f"blk.{i}."
        q_rows, kv_rows = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        orders = [pair_order(q_rows, s.num_heads), pair_order(kv_rows, s.num_kv_heads), None]
        wqkv = self.linear([p + "attn_q", p + "attn_k", p + "attn_v"], (q_rows + 2 * kv_rows, s.hidden_size), orders,
                           s.attention_bias)
        wo = self.linear([p + "attn_output"], (s.hidden_size, q_rows), bias=s.attention_bias)
        if qk_norm == "whole":  # the norms' weights follow the projections' rows into pair order
            norms = (self.norm(p + "attn_q_norm", q_rows, orders[0]), self.norm(p + "attn_k_norm", kv_rows, orders[1]))
        elif qk_norm:
            head_order = pair_order(s.head_dim, 1)
            norms = (self.norm(p + "attn_q_norm", s.head_dim, head_order), self.norm(p + "attn_k_norm", s.head_dim, head_order))
        else:
            norms = (None, None)
        options = AttentionOptions(
            s.num_heads, s.num_kv_heads, s.head_dim,
            scale=(s.query_scale or s.head_dim) ** -0.5,
            window=s.sliding_window if s.layer_types[i] == SLIDING else 0,
            softcap=s.attn_softcap,
        )
        sinks = self.vector(p + "attn_sinks.weight", s.num_heads) if s.attention_sinks else None
        return Attention(options, wqkv, wo, self.rotary(s.rope_of(i)), *norms, norm_whole=qk_norm == "whole", sinks=sinks)

    def mlp(self, i: int, expert: int | None = None) -> MLP:
        """Layer i's gated MLP, or its expert `expert`'s (`ffn_gate_exps.<expert>`...)."""
        s, p = self.spec, f"blk.{i}."
        gate, up, down = ("ffn_gate", "ffn_up", "ffn_down") if expert is None else \
            (f"ffn_gate_exps.{expert}", f"ffn_up_exps.{expert}", f"ffn_down_exps.{expert}")
        gate_up = self.linear([p + gate, p + up], (2 * s.intermediate_size, s.hidden_size), bias=s.mlp_bias)
        w_down = self.linear([p + down], (s.hidden_size, s.intermediate_size), bias=s.mlp_bias)
        return MLP(gate_up, w_down, s.intermediate_size, s.activation, s.swiglu)

    def moe(self, i: int) -> MoE:
        s = self.spec
        router = self.linear([f"blk.{i}.ffn_gate_inp"], (s.num_experts, s.hidden_size), bias=None)  # gpt-oss: biased
        experts = [self.mlp(i, e) for e in range(s.num_experts)]
        return MoE(router, experts, s.experts_per_token, s.norm_topk)

    def feed_forward(self, i: int) -> MLP | MoE:
        return self.moe(i) if self.spec.num_experts else self.mlp(i)

    def block(self, i: int, qk_norm: bool | str = False, sandwich: bool = False) -> Block:
        """A pre-norm block (attn_norm, ffn_norm); `sandwich` adds Gemma's norms after attention and the MLP."""
        p = f"blk.{i}."
        post = (self.norm(p + "post_attention_norm"), self.norm(p + "post_ffw_norm")) if sandwich else (None, None)
        return Block(self.norm(p + "attn_norm"), self.attention(i, qk_norm), self.norm(p + "ffn_norm"),
                     self.feed_forward(i), *post)

    def decoder(self, blocks: list[Block], embed_scale: float = 1.0) -> DecoderLM:
        s = self.spec
        table = self.linear(["token_embd"], (s.vocab_size, s.hidden_size))
        tied = not self.source.has("output.weight")
        head = table if tied else self.linear(["output"], (s.vocab_size, s.hidden_size))
        model = DecoderLM(s, table, blocks, self.norm("output_norm"), head, self.rotaries, embed_scale, self.options.dtype)
        return model.eval()


def _reorder(tensor: StoredTensor, order: np.ndarray | None) -> StoredTensor:
    if order is None:
        return tensor
    if tensor.rows != len(order):
        raise CorruptModel(f"{tensor.file_name} has {tensor.rows} rows; the model's config implies {len(order)}")
    return tensor.permute_rows(order)
