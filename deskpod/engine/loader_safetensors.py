"""Builds a runnable Llama from a Hugging Face safetensors folder, float or quantized by `deskpod quantize`.

A module whose folder holds `<prefix>.weight_scale` is quantized: its tensors are one QuantizedTensor
(layouts in deskpod.quant) in the scheme that config.json's quantization_config names for it; any other
weight is a float tensor, run in float32. Fused projections (q/k/v, gate/up) are built by stacking the
stored rows, which is exact because `deskpod quantize` quantizes each fused group as one matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deskpod.engine.loader import (
    WEIGHT_MODES,
    DenseLinear,
    LoadedModel,
    admit_shape,
    embedding_lookup,
    model_shape,
)
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
from deskpod.formats.safetensors import FLOAT_DTYPES, SafetensorsFolder
from deskpod.plan.capacity import MemoryPlan
from deskpod.quant.ggml import GROUP, I8Linear
from deskpod.quant.kernels import ggml_cpu

QUANT_METHOD = "deskpod"  # quantization_config.quant_method of the models `deskpod quantize` writes


def hf_llama_config(config: dict[str, Any]) -> LlamaConfig:
    """LlamaConfig from config.json (Hugging Face's LlamaConfig keys; rotate-half RoPE)."""
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    scaling = config.get("rope_scaling") or {}
    return LlamaConfig(
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(config["intermediate_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        max_context=int(config.get("max_position_embeddings", 2048)),
        rms_eps=float(config.get("rms_norm_eps", 1e-5)),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        rope_interleaved=False,
        rope_scaling=tuple((k, float(v)) for k, v in scaling.items() if isinstance(v, (int, float))),
    )


@dataclass(frozen=True)
class QuantConfig:
    """config.json's quantization_config: the scheme of every quantized module, by default or by name."""

    scheme: str | None = None
    overrides: dict[str, str] = field(default_factory=dict)  # module prefix -> scheme (the embedding's int8)
    ignore: tuple[str, ...] = ()  # modules kept at their source precision

    @classmethod
    def from_config(cls, config: dict[str, Any], where: Path) -> QuantConfig:
        quant = config.get("quantization_config")
        if not quant:
            return cls()
        if quant.get("quant_method") != QUANT_METHOD:
            raise UnsupportedModel(
                f"{where}: quantization method {quant.get('quant_method')!r} is not supported; deskpod runs float "
                f"safetensors models and those written by `deskpod quantize` (quant_method {QUANT_METHOD!r})"
            )
        return cls(quant.get("scheme"), dict(quant.get("overrides") or {}), tuple(quant.get("ignore") or ()))

    def scheme_of(self, prefix: str) -> str:
        scheme = self.overrides.get(prefix, self.scheme)
        if scheme is None:
            raise CorruptModel(f"{prefix} is quantized but quantization_config names no scheme for it")
        return scheme


class ConcatLinear(nn.Module):
    """Several linear layers side by side (their outputs concatenated): for fused projections whose parts
    cannot be stacked into one matrix (different types, or per-tensor scales that differ)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


class _Weights:
    """Reads a folder's tensors into the layer types the weight mode asks for."""

    def __init__(self, folder: SafetensorsFolder, cfg: LlamaConfig, quant: QuantConfig, mode: str):
        self.folder, self.cfg, self.quant, self.compact = folder, cfg, quant, mode == "compact"

    def vector(self, name: str) -> torch.Tensor:
        return self.folder.get(name).float()

    def is_quantized(self, prefix: str) -> bool:
        return self.folder.has(f"{prefix}.weight_scale")

    def in_features(self, prefix: str) -> int:
        """The logical input width (packed 4-bit weights store half as many bytes per row)."""
        cfg = self.cfg
        widths = {"o_proj": cfg.num_heads * cfg.head_dim, "down_proj": cfg.intermediate_size}
        return widths.get(prefix.rsplit(".", 1)[-1], cfg.hidden_size)

    def quantized(self, *prefixes: str):
        """The modules' QuantizedTensor, rows stacked; None when they cannot be stacked."""
        from deskpod.quant import QuantizedTensor

        schemes = {self.quant.scheme_of(p) for p in prefixes}
        parts = [{k.removeprefix(p): self.folder.get(k) for k in self._names(p)} for p in prefixes]
        if len(schemes) > 1 or len({tuple(sorted(t)) for t in parts}) > 1:
            return None
        stacked = {}
        for key in parts[0]:
            values = [t[key] for t in parts]
            if values[0].dim() == 0:  # a per-tensor scale: stacking is exact only when the parts share it
                if any(not torch.equal(v, values[0]) for v in values):
                    return None
                stacked[prefixes[0] + key] = values[0]
            else:
                stacked[prefixes[0] + key] = torch.cat(values)
        rows = sum(t[".weight"].shape[0] for t in parts)
        try:
            return QuantizedTensor.from_state_dict(schemes.pop(), (rows, self.in_features(prefixes[0])), stacked, prefixes[0])
        except ValueError as e:
            raise CorruptModel(f"{self.folder.path}: {e}") from None

    def _names(self, prefix: str) -> list[str]:
        return [n for n in self.folder.entries if n.startswith(prefix + ".weight")]

    def linear(self, *prefixes: str) -> nn.Module:
        """One linear layer whose output rows are the given modules' stacked (e.g. q, k and v fused)."""
        quantized = [self.is_quantized(p) for p in prefixes]
        if not any(quantized):
            return DenseLinear(torch.cat([self.folder.get(f"{p}.weight").float() for p in prefixes]))
        qt = self.quantized(*prefixes) if all(quantized) else None
        if qt is None:
            return ConcatLinear([self.linear(p) for p in prefixes]) if len(prefixes) > 1 else self._fail(prefixes[0])
        if not self.compact:
            return DenseLinear(qt.dequantize(torch.float32))
        from deskpod.quant import QuantLinear

        return QuantLinear(qt)

    def table(self, prefix: str) -> nn.Module:
        """The token embedding: int8 rows stay compact (the ggml i8 kernel also runs it as a tied head)."""
        if not self.is_quantized(prefix):
            return DenseLinear(self.folder.get(f"{prefix}.weight").float())
        qt = self.quantized(prefix)
        if qt is None:
            self._fail(prefix)
        if self.compact and qt.scheme == "int8" and qt.shape[1] % GROUP == 0 and ggml_cpu() is not None:
            return I8Linear(qt.data["weight"], qt.data["weight_scale"].float())
        return DenseLinear(qt.dequantize(torch.float32))

    def _fail(self, prefix: str):
        raise CorruptModel(f"{self.folder.path}: the tensors of {prefix} do not form one quantized weight")


def build_llama(folder: SafetensorsFolder, cfg: LlamaConfig, quant: QuantConfig, mode: str) -> Llama:
    w = _Weights(folder, cfg, quant, mode)
    rotary = Rotary(cfg)
    blocks = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        qkv = w.linear(p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj")
        attn = Attention(cfg, qkv, w.linear(p + "self_attn.o_proj"), rotary)
        mlp = MLP(w.linear(p + "mlp.gate_proj", p + "mlp.up_proj"), w.linear(p + "mlp.down_proj"), cfg.intermediate_size)
        norms = RMSNorm(w.vector(p + "input_layernorm.weight"), cfg.rms_eps), RMSNorm(w.vector(p + "post_attention_layernorm.weight"), cfg.rms_eps)
        blocks.append(Block(norms[0], attn, norms[1], mlp))
    table = w.table("model.embed_tokens")
    tied = folder.config.get("tie_word_embeddings", False) or not folder.has("lm_head.weight")
    lm_head = table if tied else w.linear("lm_head")
    model = Llama(cfg, embedding_lookup(table), blocks, RMSNorm(w.vector("model.norm.weight"), cfg.rms_eps), lm_head, rotary)
    model.table = table  # registered so its buffers count as the model's
    return model.eval()


# config.json's model_type -> builder
ARCHITECTURES: dict[str, Callable[[SafetensorsFolder, LlamaConfig, QuantConfig, str], Llama]] = {"llama": build_llama}


def planned_weight_bytes(folder: SafetensorsFolder) -> int:
    """Resident bytes once loaded, from the headers: quantized modules' tensors as stored (codes and
    scales), the weights of float modules as float32 (the CPU engine computes in float32)."""

    def resident(name: str, entry) -> int:
        quantized = folder.has(name.rsplit(".", 1)[0] + ".weight_scale")
        return entry.n_bytes if quantized or entry.dtype not in FLOAT_DTYPES else entry.n_elements * 4

    return sum(resident(name, e) for name, e in folder.entries.items())


def admit(folder: SafetensorsFolder, cfg: LlamaConfig, context: int, name: str | None) -> MemoryPlan:
    shape = model_shape(name or folder.path.name, cfg, str(folder.config.get("model_type")))
    return admit_shape(shape, planned_weight_bytes(folder), context)


def load_safetensors(path: str | Path, mode: str = "compact", context: int | None = None, name: str | None = None) -> LoadedModel:
    """The model in a Hugging Face folder, its tokenizer and config; refused with DoesNotFit when it cannot
    fit at `context` tokens. mode "float32" expands quantized weights (the reference the tests compare with)."""
    if mode not in WEIGHT_MODES:
        raise ValueError(f"weight mode {mode!r} is not one of {WEIGHT_MODES}")
    folder = SafetensorsFolder(path)
    arch = str(folder.config.get("model_type"))
    if arch not in ARCHITECTURES:
        raise UnsupportedModel(f"{path}: unsupported model_type {arch!r} (supported: {', '.join(sorted(ARCHITECTURES))})")
    quant = QuantConfig.from_config(folder.config, folder.path)
    try:
        cfg = hf_llama_config(folder.config)
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptModel(f"{path}: config.json incomplete for a {arch} model ({type(e).__name__}: {e})") from None
    admit(folder, cfg, min(context or cfg.max_context, cfg.max_context), name)
    tokenizer = Tokenizer.from_folder(folder.path)
    return LoadedModel(ARCHITECTURES[arch](folder, cfg, quant, mode), tokenizer, cfg, Path(path))
