"""ModelBuilder: reads a weight source into the shared layers. An architecture's `build(builder)` says which
layers and in what arrangement; the builder takes the tensors by canonical name, checks their shapes
against the spec, holds them in the format the options ask for, and puts q/k rows in pair order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
from deskpod.link.share import Share, take_columns, take_rows
from deskpod.quant.linear import Linear, WeightOptions, build_weight

Span = tuple[int, int]  # [start, end) rows or columns of a tensor


class ModelBuilder:
    """`share`: the part of the model this box holds when boxes are linked (deskpod.link.share) — its layers
    (pipeline), or its heads and MLP columns of every layer (tensor), whose partial sums `reduce` adds up."""

    def __init__(self, source: WeightSource, options: WeightOptions, share: Share | None = None,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.source, self.spec, self.options = source, source.spec, options
        self.share, self.reduce = share, reduce
        self._rotaries: dict[RopeSpec, int] = {}
        self.rotaries: list[Rotary] = []

    def layers(self) -> range:
        """The layers this box builds: all of them, or its share's."""
        return self.share.layers() if self.share else range(self.spec.num_layers)

    @property
    def _split(self) -> bool:
        return self.share is not None and self.share.tensor

    # --- tensors -----------------------------------------------------------------------------------

    def linear(self, names: Sequence[str], shape: tuple[int, int], orders: Sequence[np.ndarray | None] = (),
               bias: bool | None = None, rows: Sequence[Span | None] = (), columns: Span | None = None) -> Linear:
        """One Linear over the `<name>.weight` tensors stacked, rows reordered by `orders` where given. Biases:
        `bias` True takes every `<name>.bias`, False none (a file that has them is then refused as holding unused
        tensors), None those present (zeros for the parts without one). A box's split of the weight: `rows`, the
        rows of each tensor it holds (orders then apply within them); `columns`, its columns of every tensor —
        an output it sums with the other boxes', so only the first box adds the bias."""
        orders, rows = list(orders) or [None] * len(names), list(rows) or [None] * len(names)
        weights = [_reorder(_rows(self.source.take(f"{n}.weight"), r), o) for n, o, r in zip(names, orders, rows)]
        if columns is not None:
            weights = [take_columns(w, *columns) for w in weights]
        take = {True: self.source.take, None: self.source.take_optional, False: lambda name: None}[bias]
        biases = [_rows(b, r) if b is not None else None for b, r in zip((take(f"{n}.bias") for n in names), rows)]
        weight = build_weight(weights, shape, self.options)
        if not any(biases) or (columns is not None and not self.share.is_head):
            return Linear(weight)
        parts = [self._vector(b, w.rows, o) if b is not None else torch.zeros(w.rows) for b, w, o in zip(biases, weights, orders)]
        return Linear(weight, torch.cat(parts).to(self.options.device, self.options.dtype))

    def vector(self, name: str, length: int, order: np.ndarray | None = None, span: Span | None = None) -> torch.Tensor:
        """A 1-D tensor of `length` values (CorruptModel naming it when the file's has another shape); `span`:
        only those of its values."""
        values = self._vector(self.source.take(name), length, order)
        return (values if span is None else values[span[0]:span[1]]).to(self.options.device, self.options.dtype)

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
        s, p, D = self.spec, f"blk.{i}.", self.spec.head_dim
        heads, kv_heads = (self.share.heads(s), (self.share.kv_start, self.share.kv_end)) if self._split else \
            ((0, s.num_heads), (0, s.num_kv_heads))
        H, KV = heads[1] - heads[0], kv_heads[1] - kv_heads[0]
        q_rows, kv_rows = H * D, KV * D
        q_span, kv_span = (heads[0] * D, heads[1] * D), (kv_heads[0] * D, kv_heads[1] * D)
        orders = [pair_order(q_rows, H), pair_order(kv_rows, KV), None]
        wqkv = self.linear([p + "attn_q", p + "attn_k", p + "attn_v"], (q_rows + 2 * kv_rows, s.hidden_size), orders,
                           s.attention_bias, rows=[q_span, kv_span, kv_span])
        wo = self.linear([p + "attn_output"], (s.hidden_size, q_rows), bias=s.attention_bias,
                         columns=q_span if self._split else None)
        if qk_norm == "whole" and self._split:
            raise UnsupportedModel(f"{self.source.label}: its q/k norms span every head, which tensor parallel "
                                   "splits: use --parallel pipeline")
        if qk_norm == "whole":  # the norms' weights follow the projections' rows into pair order
            norms = (self.norm(p + "attn_q_norm", q_rows, orders[0]), self.norm(p + "attn_k_norm", kv_rows, orders[1]))
        elif qk_norm:
            head_order = pair_order(s.head_dim, 1)
            norms = (self.norm(p + "attn_q_norm", s.head_dim, head_order), self.norm(p + "attn_k_norm", s.head_dim, head_order))
        else:
            norms = (None, None)
        options = AttentionOptions(
            H, KV, D,
            scale=(s.query_scale or s.head_dim) ** -0.5,
            window=s.sliding_window if s.layer_types[i] == SLIDING else 0,
            softcap=s.attn_softcap,
        )
        sinks = self.vector(p + "attn_sinks.weight", s.num_heads, span=heads) if s.attention_sinks else None
        return Attention(options, wqkv, wo, self.rotary(s.rope_of(i)), *norms, norm_whole=qk_norm == "whole", sinks=sinks)

    def mlp(self, i: int, expert: int | None = None) -> MLP:
        """Layer i's gated MLP, or its expert `expert`'s (`ffn_gate_exps.<expert>`...)."""
        s, p = self.spec, f"blk.{i}."
        gate, up, down = ("ffn_gate", "ffn_up", "ffn_down") if expert is None else \
            (f"ffn_gate_exps.{expert}", f"ffn_up_exps.{expert}", f"ffn_down_exps.{expert}")
        span = (self.share.ffn_start, self.share.ffn_end) if self._split else (0, s.intermediate_size)
        width = span[1] - span[0]
        gate_up = self.linear([p + gate, p + up], (2 * width, s.hidden_size), bias=s.mlp_bias, rows=[span, span])
        w_down = self.linear([p + down], (s.hidden_size, width), bias=s.mlp_bias, columns=span if self._split else None)
        return MLP(gate_up, w_down, width, s.activation, s.swiglu)

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
                     self.feed_forward(i), *post, reduce=self.reduce if self._split else None)

    def decoder(self, blocks: list[Block], embed_scale: float = 1.0) -> DecoderLM:
        """The model around `blocks`; a linked box in a pipeline holds the embedding and the final norm and LM
        head only on the head box (which embeds and samples); under tensor parallel each box holds its rows of
        the vocabulary of both."""
        s, share = self.spec, self.share
        embeds, samples = share is None or share.owns("token_embd.weight"), share is None or share.owns("output_norm.weight")
        vocab = (share.vocab_start, share.vocab_end) if self._split else (0, s.vocab_size)
        shape = (vocab[1] - vocab[0], s.hidden_size)
        table = self.linear(["token_embd"], shape, rows=[vocab]) if embeds else None
        tied = not self.source.has("output.weight")
        head = (table if tied else self.linear(["output"], shape, rows=[vocab])) if samples else None
        norm = self.norm("output_norm") if samples else None
        model = DecoderLM(s, table, blocks, norm, head, self.rotaries, embed_scale, self.options.dtype,
                          first_layer=self.layers().start, vocab=vocab if self._split else None, reduce=self.reduce)
        return model.eval()


def _rows(tensor: StoredTensor, span: Span | None) -> StoredTensor:
    return tensor if span is None else take_rows(tensor, *span)


def _reorder(tensor: StoredTensor, order: np.ndarray | None) -> StoredTensor:
    if order is None:
        return tensor
    if tensor.rows != len(order):
        raise CorruptModel(f"{tensor.file_name} has {tensor.rows} rows; the model's config implies {len(order)}")
    return tensor.permute_rows(order)
