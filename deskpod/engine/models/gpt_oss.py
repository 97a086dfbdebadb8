"""gpt-oss (OpenAI's open-weight MoE): Llama-shaped blocks with biased q/k/v/o, attention sinks (a learned
logit per head in every softmax's denominator), sliding-window layers (128 tokens) alternating with full ones,
YaRN RoPE with its attention scaling, and experts with biases whose gated unit is a clamped SwiGLU.

Float weights only (as transformers saves a model it built); the released checkpoints' MXFP4 experts
(`*_blocks`, `*_scales`) and the harmony chat format are not read yet: those files are refused by name."""

from __future__ import annotations

from deskpod.engine.models import Architecture
from deskpod.engine.models.llama import ROPE_SCALINGS


def build(b):
    return b.decoder([b.block(i) for i in b.layers()])


ARCHITECTURE = Architecture("gpt-oss", ROPE_SCALINGS | {"moe", "sliding_window", "attention_sinks", "clamped_swiglu"},
                            build)
