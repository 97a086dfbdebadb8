"""Qwen2 and Qwen2.5 (and the DeepSeek-R1 distills built on them): Llama's blocks with q/k/v biases, which
the builder takes from the checkpoint; a sliding window on the upper layers when config.json turns it on."""

from __future__ import annotations

from deskpod.engine.models import Architecture
from deskpod.engine.models.llama import ROPE_SCALINGS


def build(b):
    for i in b.layers():  # its q/k/v biases are part of the architecture, not an option
        for part in ("attn_q", "attn_k", "attn_v"):
            b.source.info(f"blk.{i}.{part}.bias")
    return b.decoder([b.block(i) for i in b.layers()])


ARCHITECTURE = Architecture("qwen2", ROPE_SCALINGS | {"sliding_window"}, build)
