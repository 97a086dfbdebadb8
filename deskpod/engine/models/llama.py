"""Llama and the models shaped like it — Llama 2/3.x, Mistral (sliding window), SmolLM2, Mixtral — as Hugging
Face's LlamaForCausalLM / MistralForCausalLM / MixtralForCausalLM compute them: pre-norm blocks of
grouped-query attention (biases where the checkpoint has them) and a SwiGLU MLP, or Mixtral's experts."""

from __future__ import annotations

from deskpod.engine.models import Architecture

ROPE_SCALINGS = frozenset({"rope:linear", "rope:dynamic", "rope:yarn", "rope:llama3"})


def build(b):
    return b.decoder([b.block(i) for i in b.layers()])


ARCHITECTURE = Architecture("llama", ROPE_SCALINGS | {"sliding_window", "moe"}, build)
