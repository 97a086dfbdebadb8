"""OLMoE (AllenAI's OLMoE-1B-7B): Llama's blocks with an RMSNorm over the whole query and key projections
(not per head) before RoPE, and a Mixture-of-Experts in place of the MLP (top-k weights not renormalised,
as its config says)."""

from __future__ import annotations

from deskpod.engine.models import Architecture
from deskpod.engine.models.llama import ROPE_SCALINGS


def build(b):
    return b.decoder([b.block(i, qk_norm="whole") for i in b.layers()])


ARCHITECTURE = Architecture("olmoe", ROPE_SCALINGS | {"moe"}, build)
