"""A GGUF or safetensors model -> a quantized Hugging Face-style folder the engine runs.

    config.json            the source's config.json (a GGUF's spec written as one) + quantization_config
    model.safetensors      Hugging Face tensor names and conventions (rotate-half q/k rows, Gemma's `w` norms);
                           each quantized module as <module>.weight / .weight_scale / ... in deskpod.quant's layouts
    tokenizer.json, tokenizer_config.json, generation_config.json

The source is read as a weight source (deskpod.formats.weights): tensors by canonical name, whatever the
format, so every architecture the engine runs converts the same way. What stays precise, and why:
- norms, biases: a few thousand values, and every activation passes through them: kept at their source precision.
- the token embedding and the LM head: stored as int8 with a scale per 32 (8.5 bits), whatever the
  target. They hold a fifth of a small model's weights (SmolLM2: 28 M of 135 M) and small models are
  very sensitive to them: a 4-bit head spreads its error over every logit. 8 bits keep them
  within rounding of the source (a GGUF's Q8_0 embedding converts losslessly) at a quarter of float32;
  llama.cpp's Q4 mixes make the same choice (Q6_K/Q8_0 for output.weight).
- `keep` patterns (fnmatch on Hugging Face module names, e.g. "lm_head" or "model.layers.0.*") keep those
  modules at the source's precision; they are listed in quantization_config.ignore.

Fused projections (q/k/v, gate/up) are quantized as one matrix so that they share any per-tensor scale
(NVFP4's weight_scale_2), as NVIDIA ModelOpt does: the loader can then stack them back exactly.

A GGUF is dequantized to float32 first, so any scheme may be asked of it, fp8 of a Q4_1 file included: the
values are kept, no precision is gained. A model that is already quantized by deskpod (or any
quantization_config) is refused: re-quantizing compounds the rounding of both schemes; quantize its source
instead. A tensor the plan has no place for (a Mixture-of-Experts' experts, say) is refused by name.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from deskpod.errors import CorruptModel, DeskpodError, UnsupportedModel
from deskpod.formats.gguf import GGUFWeights
from deskpod.formats.gguf_tokenizer import vocabulary_from_gguf
from deskpod.formats.meta import read_meta
from deskpod.formats.safetensors import NORM_OFFSET_ARCHS, QUANT_METHOD, SafetensorsWeights, hf_module
from deskpod.formats.spec import HF_MODEL_TYPES, spec_to_hf_config
from deskpod.formats.weights import StoredTensor, WeightSource, open_weights

TABLE_SCHEME = "int8"  # the embedding's and head's scheme, whatever the target (see the module docstring)
TABLES = ("token_embd.weight", "output.weight")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
# the matrices of one layer quantized together (fused in the engine), then the single ones
LAYER_GROUPS = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"), ("attn_output",), ("ffn_down",))
KEEP_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16}  # a kept GGUF tensor's dtype (block types: float32)
_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


class QuantizeError(DeskpodError):
    """The model cannot be quantized as asked; the message says why and what to do instead."""


def already_quantized(where: object, quant: dict) -> str:
    scheme = quant.get("scheme") or quant.get("quant_algo") or quant.get("quant_method")
    source = f" ({quant['source']})" if quant.get("source") else ""
    return (f"{where} is already quantized ({scheme}); quantizing it again would add a second rounding to the "
            f"first. Quantize the original model{source} instead")


def open_source(path: str | Path, label: str | None = None) -> WeightSource:
    """The model to convert, refused when it cannot be: already quantized, or an architecture without a
    config.json layout here."""
    label = label or str(path)
    if Path(path).is_dir():
        from deskpod.formats.safetensors import read_config

        quant = read_config(Path(path)).get("quantization_config")
        if quant:
            raise QuantizeError(already_quantized(label, quant))
    source = open_weights(path, label)
    if source.spec.architecture not in HF_MODEL_TYPES:
        raise UnsupportedModel(f"{label}: `deskpod quantize` converts {', '.join(sorted(HF_MODEL_TYPES))} models, "
                               f"not {source.spec.architecture!r}")
    if source.spec.unknown:  # config.json could not carry them: the copy would run without them, wrongly
        raise UnsupportedModel(f"{label}: uses {', '.join(source.spec.unknown)}, which deskpod does not implement")
    return source


# --- the plan: which tensors, in what scheme ----------------------------------------------------------


@dataclass(frozen=True)
class Group:
    tensors: tuple[str, ...]  # canonical names, quantized together
    scheme: str | None  # None: kept at the source's precision


def plan(source: WeightSource, scheme: str, keep: tuple[str, ...] = ()) -> list[Group]:
    """Every tensor of the source in one group: the layers' matrices in `scheme` (fused ones together), the
    embedding and head in int8, vectors kept; QuantizeError naming a tensor that fits none of these."""
    names = set(source.names())
    groups = [Group((t,), TABLE_SCHEME) for t in TABLES if t in names]
    for i in range(source.spec.num_layers):
        for parts in LAYER_GROUPS:
            members = tuple(f"blk.{i}.{p}.weight" for p in parts if f"blk.{i}.{p}.weight" in names)
            if members:
                groups.append(Group(members, scheme))
    grouped = {t for g in groups for t in g.tensors}
    vectors = [n for n in source.names() if n not in grouped and len(source.info(n).shape) == 1]
    groups += [Group((n,), None) for n in vectors]
    leftover = sorted(names - grouped - set(vectors))
    if leftover:
        raise QuantizeError(f"{source.label}: no place in a quantized folder for {', '.join(leftover[:4])}"
                            f"{' ...' if len(leftover) > 4 else ''} (deskpod quantizes dense decoder models)")
    arch = source.spec.architecture
    return [Group(g.tensors, None) if _kept(g, keep, arch) else g for g in groups]


def _kept(group: Group, keep: tuple[str, ...], architecture: str) -> bool:
    modules = [hf_module(t, architecture) for t in group.tensors]
    return any(fnmatch.fnmatchcase(m, pattern) for m in modules for pattern in keep)


def check_scheme(scheme: str) -> None:
    from deskpod.quant import SCHEMES

    if scheme not in SCHEMES:
        raise QuantizeError(f"unknown quantization scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")


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


# --- conversion ------------------------------------------------------------------------------------


def convert(source_path: str | Path, dest: str | Path, scheme: str, keep: tuple[str, ...] = (),
            source_name: str | None = None, on_group: Callable[[Group, int, int], object] | None = None) -> ConvertReport:
    """Write the quantized model folder `dest` (created; must not exist). on_group(group, index, total) is
    called as each group starts (progress). Raises QuantizeError / CorruptModel naming the tensor at fault."""
    check_scheme(scheme)
    source = open_source(source_path, source_name)
    groups = plan(source, scheme, keep)
    dest = Path(dest)
    dest.mkdir(parents=True)
    tensors, report = {}, ConvertReport(scheme)
    for index, group in enumerate(groups):
        if on_group:
            on_group(group, index, len(groups))
        params, converted = _convert_group(source, group)
        tensors.update(converted)
        report.add(group.scheme, params, sum(t.numel() * t.element_size() for t in converted.values()))
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    config = _config(source)
    if any(g.scheme for g in groups):  # everything kept (--keep '*'): a float model, with no quantization_config
        # packed codes hide the parameter count from the tensor shapes: record it for `deskpod list`
        config["quantization_config"] = {**_quant_config(groups, scheme, keep, source), "parameters": sum(report.params.values())}
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(source, dest)
    return report


def _config(source: WeightSource) -> dict:
    if isinstance(source, SafetensorsWeights):
        return dict(source.folder.config)
    config = spec_to_hf_config(source.spec)
    meta = source.gguf.metadata
    config.update(bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"))
    return config


def _write_tokenizer(source: WeightSource, dest: Path) -> None:
    if isinstance(source, GGUFWeights):
        vocabulary_from_gguf(source.gguf.metadata, source.label).save(dest)
        return
    for name in TOKENIZER_FILES:
        if (source.folder.path / name).is_file():
            shutil.copyfile(source.folder.path / name, dest / name)


def _quant_config(groups: list[Group], scheme: str, keep: tuple[str, ...], source: WeightSource) -> dict:
    arch = source.spec.architecture
    module = {t: hf_module(t, arch) for g in groups for t in g.tensors}
    return {
        "quant_method": QUANT_METHOD,
        "scheme": scheme,
        "ignore": [module[t] for g in groups if g.scheme is None for t in g.tensors if t.endswith(".weight")],
        "overrides": {module[t]: g.scheme for g in groups if g.scheme not in (None, scheme) for t in g.tensors},
        "keep": list(keep),
        "source": source.label,
        "source_quantization": _source_precision(source),
    }


def _source_precision(source: WeightSource) -> str:
    """The GGUF's file type ("Q4_K_M"), or the folder's one dtype ("BF16"; "mixed" when they differ)."""
    if isinstance(source, GGUFWeights):
        return read_meta(source.gguf.path).quantization
    dtypes = {t.dtype for t in source.tensors()}
    return dtypes.pop() if len(dtypes) == 1 else "mixed"


def _convert_group(source: WeightSource, group: Group) -> tuple[int, dict[str, torch.Tensor]]:
    """(weights in the group, the tensors to write for it, by Hugging Face name)."""
    arch = source.spec.architecture
    stored = [source.take(t) for t in group.tensors]
    weights = [_finite(t.float(), t.file_name, source) for t in stored]
    params = sum(w.numel() for w in weights)
    names = [f"{hf_module(t.name, arch)}.{t.name.rsplit('.', 1)[1]}" for t in stored]
    if group.scheme is None:
        return params, {n: _as_stored(w, t, arch) for n, w, t in zip(names, weights, stored)}
    from deskpod.quant import quantize

    try:
        qt = quantize(torch.cat(weights), group.scheme)
    except ValueError as e:
        raise QuantizeError(f"{source.label}: {', '.join(group.tensors)}: {e}") from None
    rows, out = [w.shape[0] for w in weights], {}
    for key, value in qt.data.items():
        parts = [value] * len(rows) if value.dim() == 0 else value.split(rows)
        for name, part in zip(names, parts):
            out[name.removesuffix(".weight") + f".{key}"] = part.clone().contiguous()  # own storage for safetensors
    return params, out


def _as_stored(values: torch.Tensor, tensor: StoredTensor, architecture: str) -> torch.Tensor:
    """A kept tensor as Hugging Face stores it: Gemma's norms as w for (1 + w), in the source's float dtype."""
    if architecture in NORM_OFFSET_ARCHS and tensor.name.endswith("norm.weight"):
        values = values - 1
    return values.to(KEEP_DTYPES.get(tensor.dtype, torch.float32)).contiguous()


def _finite(w: torch.Tensor, name: str, source: WeightSource) -> torch.Tensor:
    if not torch.isfinite(w).all():
        bad = "NaN" if torch.isnan(w).any() else "infinite"
        raise CorruptModel(f"{source.label}: tensor {name} contains {bad} values; the source model is damaged "
                           "(pull it again, or convert it afresh from its original)")
    return w
