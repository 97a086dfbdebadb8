"""Qwen3 (dense): Llama's blocks with an RMSNorm over each head's queries and keys before RoPE, and a
head_dim of its own (128, whatever the width)."""

from __future__ import annotations

from deskpod.engine.models import Architecture
from deskpod.engine.models.llama import ROPE_SCALINGS


def build(b):
    return b.decoder([b.block(i, qk_norm=True) for i in range(b.spec.num_layers)])


ARCHITECTURE = Architecture("qwen3", ROPE_SCALINGS | {"sliding_window"}, build)
