"""GGUF or safetensors Llama -> a quantized Hugging Face-style folder the engine runs.

    config.json            the source's shape in LlamaConfig keys + quantization_config
    model.safetensors      HF tensor names, rotate-half RoPE; each quantized module as
                           <prefix>.weight / .weight_scale / ... in deskpod.quant's layouts
    tokenizer.json, tokenizer_config.json, generation_config.json

What stays precise, and why:
- norms: a few thousand values, and every activation passes through them: kept at their source precision.
- the token embedding and the LM head: stored as int8 with a scale per 32 (8.5 bits), whatever the
  target. They hold a fifth of a small model's weights (SmolLM2: 28 M of 135 M) and small models are
  very sensitive to them: a 4-bit head spreads its error over every logit. 8 bits keep them
  within rounding of the source (a GGUF's Q8_0 embedding converts losslessly) at a quarter of float32;
  llama.cpp's Q4 mixes make the same choice (Q6_K/Q8_0 for output.weight).
- `keep` patterns (fnmatch on module names, e.g. "lm_head" or "model.layers.0.*") keep those modules
  at the source's precision; they are listed in quantization_config.ignore.

Fused projections (q/k/v, gate/up) are quantized as one matrix so that they share any per-tensor scale
(NVFP4's weight_scale_2), as NVIDIA ModelOpt does: the loader can then stack them back exactly.

Sources: a GGUF is dequantized to float32 first (its q/k rows un-permuted from GGUF's interleaved RoPE
order), so any scheme may be asked of it, fp8 of a Q4_1 file included: the values are kept, no
precision is gained. A model that is already quantized by deskpod (or any quantization_config) is
refused: re-quantizing compounds the rounding of both schemes; quantize its source instead.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import save_file

from deskpod.engine.loader import llama_config, model_format
from deskpod.engine.loader_safetensors import QUANT_METHOD
from deskpod.engine.models.llama import LlamaConfig
from deskpod.engine.tokenizer import Tokenizer
from deskpod.errors import CorruptModel, DeskpodError, UnsupportedModel
from deskpod.formats.gguf import GGUFFile
from deskpod.formats.safetensors import SafetensorsFolder

EMBEDDING, HEAD = "model.embed_tokens", "lm_head"
TABLE_SCHEME = "int8"  # the embedding's and head's scheme, whatever the target (see the module docstring)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")

# HF module suffix (inside model.layers.{i}.) -> GGUF tensor (inside blk.{i}.)
GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
GGUF_GLOBAL_NAMES = {EMBEDDING: "token_embd", "model.norm": "output_norm", HEAD: "output"}
# GGUF tensor types -> the dtype a kept tensor is written in (block types: their exact float32 expansion)
GGUF_KEEP_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16}
# the modules of one layer quantized together (fused in the engine), then the single ones
LAYER_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


class QuantizeError(DeskpodError):
    """The model cannot be quantized as asked; the message says why and what to do instead."""


class ModelSource(Protocol):
    """A Llama model to convert: its HF config, its tensors in float32 by HF module name."""

    path: Path
    label: str  # how messages and quantization_config.source name it: the store ref, else the path
    config: dict  # config.json keys (no quantization_config)
    quantization: str  # the source's own precision, for the record ("Q4_1", "BF16")

    def weight(self, module: str) -> torch.Tensor: ...  # float32, HF layout and RoPE order

    def has(self, module: str) -> bool: ...

    def keep_dtype(self, module: str) -> torch.dtype: ...  # the dtype a kept module is written in

    def write_tokenizer(self, dest: Path) -> None: ...


def unpermute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """GGUF's q/k rows -> HF's: llama.cpp's converter interleaves the two halves of each head's rows
    (for RoPE on adjacent pairs); this is the inverse of its `permute`."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
    def __init__(self, path: Path, label: str | None = None):
        self.path, self.label = path, label or str(path)
        self.gguf = GGUFFile(path)
        if self.gguf.architecture != "llama":
            raise UnsupportedModel(f"{self.label}: `deskpod quantize` converts Llama models, not {self.gguf.architecture!r}")
        self.cfg = llama_config(self.gguf)
        self.tokenizer = Tokenizer.from_gguf(self.gguf)
        tied = not self.gguf.has_tensor("output.weight")
        self.config = hf_config(self.cfg, tied, self.tokenizer)
        self.quantization = _gguf_quantization(self.gguf)

    def _gguf_name(self, module: str) -> str:
        if module in GGUF_GLOBAL_NAMES:
            return GGUF_GLOBAL_NAMES[module] + ".weight"
        _, _, layer, suffix = module.split(".", 3)
        return f"blk.{layer}.{GGUF_LAYER_NAMES[suffix]}.weight"

    def has(self, module: str) -> bool:
        return self.gguf.has_tensor(self._gguf_name(module))

    def weight(self, module: str) -> torch.Tensor:
        w = torch.from_numpy(self.gguf.dequantize(self._gguf_name(module)).copy())
        rope_heads = {"self_attn.q_proj": self.cfg.num_heads, "self_attn.k_proj": self.cfg.num_kv_heads}
        heads = rope_heads.get(module.split(".", 3)[-1])
        return unpermute_rope(w, heads) if heads else w

    def keep_dtype(self, module: str) -> torch.dtype:
        return GGUF_KEEP_DTYPES.get(self.gguf.raw(self._gguf_name(module)).ggml_type, torch.float32)

    def write_tokenizer(self, dest: Path) -> None:
        self.tokenizer.save(dest)
        special = self.tokenizer.special
        generation = {"bos_token_id": special.bos_id, "eos_token_id": sorted(self.tokenizer.eog_ids)}
        (dest / "generation_config.json").write_text(json.dumps(generation, indent=2))


class FolderSource:
    def __init__(self, path: Path, label: str | None = None):
        self.path, self.label = path, label or str(path)
        self.folder = SafetensorsFolder(path)
        self.config = dict(self.folder.config)
        quant = self.config.get("quantization_config")
        if quant:
            raise QuantizeError(already_quantized(self.label, quant))
        if self.config.get("model_type") != "llama":
            raise UnsupportedModel(f"{self.label}: `deskpod quantize` converts Llama models, not {self.config.get('model_type')!r}")
        dtypes = {e.dtype for e in self.folder.entries.values()}
        self.quantization = dtypes.pop() if len(dtypes) == 1 else "mixed"

    def has(self, module: str) -> bool:
        return self.folder.has(module + ".weight")

    def weight(self, module: str) -> torch.Tensor:
        return self.folder.get(module + ".weight").float()

    def keep_dtype(self, module: str) -> torch.dtype:
        return self.folder.get(module + ".weight").dtype

    def write_tokenizer(self, dest: Path) -> None:
        for name in TOKENIZER_FILES:
            if (self.path / name).is_file():
                shutil.copyfile(self.path / name, dest / name)


SOURCES: dict[str, Callable[[Path, str | None], ModelSource]] = {"gguf": GGUFSource, "safetensors": FolderSource}


def already_quantized(where: object, quant: dict) -> str:
    scheme = quant.get("scheme") or quant.get("quant_algo") or quant.get("quant_method")
    source = f" ({quant['source']})" if quant.get("source") else ""
    return (f"{where} is already quantized ({scheme}); quantizing it again would add a second rounding to the "
            f"first. Quantize the original model{source} instead")


def open_source(path: str | Path, label: str | None = None) -> ModelSource:
    path = Path(path)
    return SOURCES[model_format(path)](path, label)


def hf_config(cfg: LlamaConfig, tied: bool, tokenizer: Tokenizer) -> dict:
    """config.json for a LlamaConfig (HF's LlamaConfig keys)."""
    scaling = dict(cfg.rope_scaling)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_context,
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": {"rope_type": "llama3", **scaling} if scaling else None,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": tokenizer.special.bos_id,
        "eos_token_id": tokenizer.special.eos_id,
        "torch_dtype": "float32",
    }


def _gguf_quantization(gguf: GGUFFile) -> str:
    from deskpod.formats.meta import read_meta

    return read_meta(gguf.path).quantization


# --- the plan: which modules, in what scheme ----------------------------------------------------


@dataclass(frozen=True)
class Group:
    modules: tuple[str, ...]  # HF module prefixes, quantized together
    scheme: str | None  # None: kept at the source's precision


@dataclass
class ConvertReport:
    """What was written: weights per scheme (None: kept precise), in parameters and bytes."""

    scheme: str
    params: dict[str | None, int] = field(default_factory=dict)
    nbytes: dict[str | None, int] = field(default_factory=dict)

    def add(self, scheme: str | None, params: int, nbytes: int) -> None:
        self.params[scheme] = self.params.get(scheme, 0) + params
        self.nbytes[scheme] = self.nbytes.get(scheme, 0) + nbytes

    @property
    def bits_per_weight(self) -> float:
        """Over all weights, the precise ones included."""
        return 8 * sum(self.nbytes.values()) / max(1, sum(self.params.values()))

    def scheme_bits(self, scheme: str | None) -> float:
        return 8 * self.nbytes.get(scheme, 0) / max(1, self.params.get(scheme, 0))

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes.values())


def plan(source: ModelSource, scheme: str, keep: tuple[str, ...] = ()) -> list[Group]:
    layers = int(source.config["num_hidden_layers"])
    groups = [Group((EMBEDDING,), TABLE_SCHEME)]
    for i in range(layers):
        p = f"model.layers.{i}."
        groups += [Group(tuple(p + m for m in modules), scheme) for modules in LAYER_GROUPS]
        groups += [Group((p + norm,), None) for norm in LAYER_NORMS]
    groups.append(Group(("model.norm",), None))
    if source.has(HEAD) and not source.config.get("tie_word_embeddings"):
        groups.append(Group((HEAD,), TABLE_SCHEME))
    return [g if not _kept(g, keep) else Group(g.modules, None) for g in groups]


def _kept(group: Group, keep: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(m, pattern) for m in group.modules for pattern in keep)


def check_scheme(scheme: str) -> None:
    from deskpod.quant import SCHEMES

    if scheme not in SCHEMES:
        raise QuantizeError(f"unknown quantization scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")


# --- conversion ------------------------------------------------------------------------------------


def convert(source_path: str | Path, dest: str | Path, scheme: str, keep: tuple[str, ...] = (),
            source_name: str | None = None, on_group: Callable[[Group, int, int], object] | None = None) -> ConvertReport:
    """Write the quantized model folder `dest` (created; must not exist). on_group(group, index, total) is
    called as each group starts (progress). Raises QuantizeError / CorruptModel naming the tensor at fault."""
    check_scheme(scheme)
    source = open_source(source_path, source_name)
    dest = Path(dest)
    dest.mkdir(parents=True)
    groups = plan(source, scheme, keep)
    tensors, report = {}, ConvertReport(scheme)
    for index, group in enumerate(groups):
        if on_group:
            on_group(group, index, len(groups))
        params, converted = _convert_group(source, group)
        tensors.update(converted)
        report.add(group.scheme, params, sum(t.numel() * t.element_size() for t in converted.values()))
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    config = dict(source.config)
    if any(g.scheme for g in groups):  # everything kept (--keep '*'): a float model, with no quantization_config
        # packed codes hide the parameter count from the tensor shapes: record it for `deskpod list`
        config["quantization_config"] = {**_quant_config(groups, scheme, keep, source), "parameters": sum(report.params.values())}
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    source.write_tokenizer(dest)
    return report


def _quant_config(groups: list[Group], scheme: str, keep: tuple[str, ...], source: ModelSource) -> dict:
    return {
        "quant_method": QUANT_METHOD,
        "scheme": scheme,
        "ignore": [m for g in groups if g.scheme is None for m in g.modules],
        "overrides": {m: g.scheme for g in groups if g.scheme not in (None, scheme) for m in g.modules},
        "keep": list(keep),
        "source": source.label,
        "source_quantization": source.quantization,
    }


def _convert_group(source: ModelSource, group: Group) -> tuple[int, dict[str, torch.Tensor]]:
    """(weights in the group, the tensors to write for it)."""
    weights = [_finite(source.weight(m), m, source) for m in group.modules]
    params = sum(w.numel() for w in weights)
    if group.scheme is None:
        return params, {f"{m}.weight": w.to(source.keep_dtype(m)).contiguous() for m, w in zip(group.modules, weights)}
    from deskpod.quant import quantize

    try:
        qt = quantize(torch.cat(weights), group.scheme)
    except ValueError as e:
        raise QuantizeError(f"{source.label}: {', '.join(group.modules)}: {e}") from None
    rows, out = [w.shape[0] for w in weights], {}
    for key, value in qt.data.items():
        parts = [value] * len(rows) if value.dim() == 0 else value.split(rows)
        for m, part in zip(group.modules, parts):
            out[f"{m}.{key}"] = part.clone().contiguous()  # own storage: safetensors refuses shared tensors
    return params, out


def _finite(w: torch.Tensor, module: str, source: ModelSource) -> torch.Tensor:
    if not torch.isfinite(w).all():
        bad = "NaN" if torch.isnan(w).any() else "infinite"
        raise CorruptModel(f"{source.label}: tensor {module}.weight contains {bad} values; the source model is damaged "
                           "(pull it again, or convert it afresh from its original)")
    return w
