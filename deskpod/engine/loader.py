"""Builds a runnable model from a GGUF file (config from metadata, weights compact or float32), and
`load_model`, which picks the loader for any model file or folder by its format."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deskpod.engine.models.llama import (
    MLP,
    Attention,
    Block,
    Llama,
    LlamaConfig,
    RMSNorm,
    Rotary,
)
from deskpod.engine.tokenizer import Tokenizer
from deskpod.errors import CorruptModel, UnsupportedModel
from deskpod.formats.gguf import GGUFFile
from deskpod.plan.capacity import MemoryPlan, check_fits
from deskpod.plan.devices import available_memory_bytes
from deskpod.plan.shape import ModelShape
from deskpod.quant.ggml import BYTES_PER_WEIGHT, I8Linear, compact_form, compact_linear

# "compact" keeps GGUF's quantized blocks and runs them with deskpod's kernels; "float32" expands every
# weight with the gguf package's reference dequantization (the path the correctness tests compare against).
WEIGHT_MODES = ("compact", "float32")


class DenseLinear(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)  # [out, in]
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


@dataclass
class LoadedModel:
    model: Llama
    tokenizer: Tokenizer
    config: LlamaConfig
    path: Path

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.model.buffers()) + sum(
            p.numel() * p.element_size() for p in self.model.parameters()
        )


def llama_config(gguf: GGUFFile) -> LlamaConfig:
    hidden = int(gguf.arch_value("embedding_length"))
    heads = int(gguf.arch_value("attention.head_count"))
    tokens = gguf.metadata.get("tokenizer.ggml.tokens") or []
    scaling = {}
    if gguf.arch_value("rope.scaling.type") == "llama3" or gguf.has_tensor("rope_freqs.weight"):
        scaling = {  # Llama 3.1 stores the rescaled frequencies as a tensor; we recompute them from the factors
            "factor": float(gguf.arch_value("rope.scaling.factor", 8.0)),
            "original_max_position_embeddings": float(gguf.arch_value("rope.scaling.original_context_length", 8192)),
        }
    return LlamaConfig(
        vocab_size=int(gguf.arch_value("vocab_size", len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(gguf.arch_value("feed_forward_length")),
        num_layers=int(gguf.arch_value("block_count")),
        num_heads=heads,
        num_kv_heads=int(gguf.arch_value("attention.head_count_kv", heads)),
        head_dim=int(gguf.arch_value("attention.key_length", hidden // heads)),
        max_context=int(gguf.arch_value("context_length", 2048)),
        rms_eps=float(gguf.arch_value("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(gguf.arch_value("rope.freq_base", 10000.0)),
        rope_interleaved=True,
        rope_scaling=tuple(scaling.items()),
    )


KV_DTYPE_BYTES = 4  # the CPU engine keeps keys and values in float32


def planned_weight_bytes(gguf: GGUFFile, mode: str) -> int:
    """What the weights will take once loaded in this mode, known before loading any of them."""
    total = 0.0
    for info in gguf.tensors():
        form = compact_form(info.ggml_type, info.shape) if mode == "compact" else None
        total += info.n_elements * (BYTES_PER_WEIGHT[form] if form else 4)
    return int(total)


def model_shape(name: str | Path, cfg: LlamaConfig, architecture: str = "llama") -> ModelShape:
    """The planner's view of a loaded (or about to be loaded) model."""
    return ModelShape(
        name=str(name), architecture=architecture, num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size, max_context=cfg.max_context,
    )


def admit_shape(shape: ModelShape, weight_bytes: int, context: int) -> MemoryPlan:
    """Refuses (DoesNotFit, with the breakdown and the ways out) a model that cannot fit in the memory
    free right now, with the same functions `deskpod plan` uses; every loader admits through here."""
    return check_fits(shape, weight_bytes, context, available_memory_bytes(), kv_dtype_bytes=KV_DTYPE_BYTES)


def admit(gguf: GGUFFile, cfg: LlamaConfig, mode: str, context: int, name: str | None = None) -> MemoryPlan:
    shape = model_shape(name or gguf.path.name, cfg, gguf.architecture)
    return admit_shape(shape, planned_weight_bytes(gguf, mode), context)


class _Weights:
    """Reads tensors from a GGUF file into the layer types the chosen weight mode asks for."""

    def __init__(self, gguf: GGUFFile, mode: str):
        self.gguf, self.compact = gguf, mode == "compact"

    def vector(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self.gguf.dequantize(name).copy())

    def linear(self, *names: str) -> nn.Module:
        """One linear layer whose output rows are the given tensors stacked (e.g. q, k and v fused)."""
        raws = [self.gguf.raw(n) for n in names]
        types = {r.ggml_type for r in raws}
        if self.compact and len(types) == 1:
            rows = sum(r.shape[0] for r in raws)
            data = np.concatenate([np.asarray(r.data).reshape(r.shape[0], -1) for r in raws])
            layer = compact_linear(types.pop(), data, (rows, raws[0].shape[1]))
            if layer is not None:
                return layer
        return DenseLinear(torch.from_numpy(np.concatenate([self.gguf.dequantize(n) for n in names])))


def embedding_lookup(table: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """ids [T] -> rows [T, hidden] of an embedding table held as a linear layer (compact int8 or float)."""
    if isinstance(table, I8Linear):
        return table.rows
    return lambda ids: F.embedding(ids, table.weight)


def build_llama(gguf: GGUFFile, cfg: LlamaConfig, mode: str) -> Llama:
    w = _Weights(gguf, mode)
    rotary = Rotary(cfg)
    blocks = []
    for i in range(cfg.num_layers):
        p = f"blk.{i}."
        attn = Attention(cfg, w.linear(p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"), w.linear(p + "attn_output.weight"), rotary)
        mlp = MLP(w.linear(p + "ffn_gate.weight", p + "ffn_up.weight"), w.linear(p + "ffn_down.weight"), cfg.intermediate_size)
        blocks.append(Block(RMSNorm(w.vector(p + "attn_norm.weight"), cfg.rms_eps), attn, RMSNorm(w.vector(p + "ffn_norm.weight"), cfg.rms_eps), mlp))
    table = w.linear("token_embd.weight")
    lm_head = w.linear("output.weight") if gguf.has_tensor("output.weight") else table  # tied when absent
    model = Llama(cfg, embedding_lookup(table), blocks, RMSNorm(w.vector("output_norm.weight"), cfg.rms_eps), lm_head, rotary)
    model.table = table  # registered so its buffers count as the model's
    return model.eval()


# general.architecture → builder. GGUF writes Mistral and other Llama-shaped models as "llama".
ARCHITECTURES: dict[str, Callable[[GGUFFile, LlamaConfig, str], Llama]] = {"llama": build_llama}


def load_gguf(path: str | Path, mode: str = "compact", context: int | None = None, name: str | None = None) -> LoadedModel:
    """The model, its tokenizer and config; refused with DoesNotFit when it cannot fit at `context`
    tokens (default: the model's full context). `name` is how errors call the model."""
    if mode not in WEIGHT_MODES:
        raise ValueError(f"weight mode {mode!r} is not one of {WEIGHT_MODES}")
    gguf = GGUFFile(path)
    arch = gguf.architecture
    if arch not in ARCHITECTURES:
        raise UnsupportedModel(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(sorted(ARCHITECTURES))})")
    try:
        cfg = llama_config(gguf)
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptModel(f"{path}: metadata incomplete for architecture {arch!r} ({e})") from None
    admit(gguf, cfg, mode, min(context or cfg.max_context, cfg.max_context), name)
    tokenizer = Tokenizer.from_gguf(gguf)
    model = ARCHITECTURES[arch](gguf, cfg, mode)
    return LoadedModel(model, tokenizer, cfg, Path(path))


def _load_safetensors(path: str | Path, mode: str = "compact", context: int | None = None, name: str | None = None) -> LoadedModel:
    # imported here: loader_safetensors builds on the layers above
    from deskpod.engine.loader_safetensors import load_safetensors

    return load_safetensors(path, mode, context, name)


# model format -> loader: a .gguf file, or a Hugging Face folder (float, or written by `deskpod quantize`)
LOADERS: dict[str, Callable[..., LoadedModel]] = {"gguf": load_gguf, "safetensors": _load_safetensors}


def model_format(path: str | Path) -> str:
    return "safetensors" if Path(path).is_dir() else "gguf"


def load_model(path: str | Path, mode: str = "compact", context: int | None = None, name: str | None = None) -> LoadedModel:
    """load_gguf or load_safetensors, whichever the path is (a folder is a safetensors model)."""
    return LOADERS[model_format(path)](path, mode, context, name)
