"""Qwen3, dense and Mixture-of-Experts (Qwen3-30B-A3B, 235B-A22B): Llama's blocks with an RMSNorm over each
head's queries and keys before RoPE, a head_dim of its own (128, whatever the width), and for the MoE models
a router over the experts in place of the MLP."""

from __future__ import annotations

from deskpod.engine.models import Architecture
from deskpod.engine.models.llama import ROPE_SCALINGS


def build(b):
    return b.decoder([b.block(i, qk_norm=True) for i in b.layers()])


ARCHITECTURE = Architecture("qwen3", ROPE_SCALINGS | {"sliding_window", "moe"}, build)
