"""What deskpod knows about a model without loading its weights."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelMeta:
    format: str  # "gguf" | "safetensors" | "onnx"
    architecture: str  # "llama", "gemma3", "bert", "onnx", ...
    parameters: int  # total parameter count (0 when unknown)
    quantization: str  # "Q4_1", "Q4_K_M", "F32", "BF16", "mixed", "unknown"
    context_length: int  # 0 when not applicable
    # Transformer shape, 0 when unknown or not a decoder LLM; the planner and KV cache sizing use these.
    num_layers: int = 0
    hidden_size: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    vocab_size: int = 0
    intermediate_size: int = 0
