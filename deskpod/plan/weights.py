"""WeightBytes: what a model's weights cost in memory, by part, and what one token reads of them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from deskpod.plan.precision import Scheme
from deskpod.plan.shape import ModelShape


@dataclass(frozen=True)
class WeightBytes:
    embedding: int  # token embedding (the LM head too, when tied)
    head: int  # LM head; 0 when tied
    dense: int  # block weights every token uses: attention, norms, routers, shared experts
    experts: int  # all routed experts together; 0 for a dense model
    tied: bool = False

    @property
    def total(self) -> int:
        return self.embedding + self.head + self.dense + self.experts

    def read_per_step(self, shape: ModelShape, batch: int = 1) -> int:
        """Bytes a decode step reads: dense blocks, the experts the batch routes to, the LM head.

        With B sequences each picking k of E experts at random, a layer touches
        E·(1 − (1 − k/E)^B) distinct experts in expectation.
        """
        head = self.embedding if self.tied else self.head
        return self.dense + int(self.experts * expert_fraction(shape, batch)) + head


def expert_fraction(shape: ModelShape, tokens: int) -> float:
    if not shape.is_moe:
        return 0.0
    k, e = shape.experts_per_token, shape.num_experts
    return 1 - (1 - k / e) ** max(1, tokens)


def weight_bytes(shape: ModelShape, scheme: Scheme) -> WeightBytes:
    """The weights of `shape` stored in `scheme` (see deskpod.plan.precision for the bits)."""
    experts = shape.num_layers * shape.num_experts * shape.expert_params
    dense = shape.body_params - experts + shape.hidden_size  # + the final norm
    head_bits = max(scheme.head_bits, scheme.embed_bits) if shape.tied_embeddings else scheme.embed_bits
    return WeightBytes(
        embedding=_bytes(shape.embedding_params, head_bits),
        head=_bytes(shape.head_params, scheme.head_bits),
        dense=_bytes(dense, scheme.body_bits),
        experts=_bytes(experts, scheme.body_bits),
        tied=shape.tied_embeddings,
    )


def _bytes(params: int, bits: float) -> int:
    return math.ceil(params * bits / 8)
