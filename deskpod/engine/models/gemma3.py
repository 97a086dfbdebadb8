"""Gemma 3 (text): embeddings scaled by sqrt(hidden); four norms a block (before and after attention and the
MLP); per-head q/k RMSNorm; GELU-tanh MLP; scores scaled by query_pre_attn_scalar^-1/2; five local
(sliding-window) layers to one global, the local ones with their own RoPE base."""

from __future__ import annotations

import math

from deskpod.engine.models import Architecture


def build(b):
    blocks = [b.block(i, qk_norm=True, sandwich=True) for i in b.layers()]
    return b.decoder(blocks, embed_scale=math.sqrt(b.spec.hidden_size))


ARCHITECTURE = Architecture(
    "gemma3",
    frozenset({"sliding_window", "local_rope", "activation:gelu_tanh", "query_scale", "rope:linear", "rope:yarn"}),
    build,
)
