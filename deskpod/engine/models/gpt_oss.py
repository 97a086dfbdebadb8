"""gpt-oss (OpenAI's open-weight MoE): Llama-shaped blocks with biased q/k/v/o, attention sinks (a learned
logit per head in every softmax's denominator), sliding-window layers (128 tokens) alternating with full ones,
YaRN RoPE with its attention scaling, and experts with biases whose gated unit is a clamped SwiGLU.

From config.json and safetensors (float, or the released checkpoints' MXFP4 experts, `*_blocks` / `*_scales`)
and from llama.cpp's GGUF (`gpt-oss`: MXFP4 experts, its conventions in spec.GGUF_CONVENTIONS); the experts stay
in MXFP4. Its harmony chat format is read by deskpod.server.openai.chat.harmony."""

from __future__ import annotations

from deskpod.engine.models import Architecture
from deskpod.engine.models.llama import ROPE_SCALINGS


def build(b):
    return b.decoder([b.block(i) for i in b.layers()])


ARCHITECTURE = Architecture("gpt-oss", ROPE_SCALINGS | {"moe", "sliding_window", "attention_sinks", "clamped_swiglu"},
                            build)
