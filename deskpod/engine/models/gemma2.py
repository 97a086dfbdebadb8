"""Gemma 2: Gemma 3's sandwich-normed blocks without q/k norms, alternating local and global layers, and
tanh softcapping of the attention scores and of the final logits."""

from __future__ import annotations

import math

from deskpod.engine.models import Architecture


def build(b):
    blocks = [b.block(i, sandwich=True) for i in b.layers()]
    return b.decoder(blocks, embed_scale=math.sqrt(b.spec.hidden_size))


ARCHITECTURE = Architecture(
    "gemma2",
    frozenset({"sliding_window", "activation:gelu_tanh", "query_scale", "attn_softcap", "final_softcap"}),
    build,
)
