"""A Hugging Face model folder for reading: config.json plus the tensors of every *.safetensors shard.

Headers are parsed once (8-byte length + JSON) so sizes and dtypes are known before any weight is
read; tensors come from the `safetensors` package, memory-mapped. A broken file names itself.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deskpod.errors import CorruptModel, UnsupportedModel
from deskpod.formats.weights import FLOAT_DTYPES, SchemeTensor, StoredTensor, WeightSource, spec_error

if TYPE_CHECKING:  # header reading stays light: `deskpod list` reads metadata without torch
    import torch

# safetensors dtype names -> bytes per element
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    dtype: str  # safetensors' name: "F32", "BF16", "F8_E4M3", "U8", ...
    shape: tuple[int, ...]

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def n_bytes(self) -> int:
        return self.n_elements * DTYPE_BYTES.get(self.dtype, 1)


class SafetensorsFolder:
    """config.json and the tensors of a model folder (one model.safetensors or several shards)."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder)
        self.config = read_config(self.path)
        files = weight_files(self.path)
        self.entries: dict[str, TensorEntry] = {}
        for file in files:
            for name, entry in read_header(file).items():
                if name in self.entries:
                    raise CorruptModel(f"{self.path}: tensor {name!r} is in both {self.entries[name].file.name} and {file.name}")
                self.entries[name] = entry
        self._handles: dict[Path, Any] = {}

    def has(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> torch.Tensor:
        """The tensor as stored (its own dtype), memory-mapped where the dtype allows."""
        entry = self.entries.get(name)
        if entry is None:
            raise CorruptModel(f"{self.path}: tensor {name!r} is missing")
        from safetensors import SafetensorError, safe_open

        try:
            if entry.file not in self._handles:
                self._handles[entry.file] = safe_open(str(entry.file), framework="pt")
            return self._handles[entry.file].get_tensor(name)
        except (SafetensorError, RuntimeError, ValueError) as e:  # the library's word for a damaged file
            raise CorruptModel(f"{entry.file}: tensor {name!r} cannot be read ({e})") from None


INDEX = "model.safetensors.index.json"  # Hugging Face's map of a sharded checkpoint's tensors to its files


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's files: those its index names when it has one (repositories also ship other weight files
    beside the shards, Mistral's consolidated.safetensors among them), else every *.safetensors."""
    if (folder / INDEX).is_file():
        try:
            names = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise CorruptModel(f"{folder / INDEX}: not a valid index ({type(e).__name__}: {e})") from None
        missing = [n for n in names if not (folder / n).is_file() or "/" in n]
        if missing:
            raise CorruptModel(f"{folder / INDEX} names {', '.join(missing)}, which the folder lacks")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UnsupportedModel(f"{folder}: no *.safetensors weights in this folder")
    return files


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise UnsupportedModel(f"{folder}: a safetensors model folder needs a config.json")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptModel(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CorruptModel(f"{path}: expected a JSON object")
    return config


def read_header(file: Path) -> dict[str, TensorEntry]:
    """Every tensor's dtype and shape from the header alone; CorruptModel when it is truncated or malformed."""
    size = file.stat().st_size
    with file.open("rb") as f:
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < n <= size - 8:
            raise CorruptModel(f"{file}: truncated safetensors (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptModel(f"{file}: safetensors header is not valid JSON ({e})") from None
    entries = {}
    try:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["data_offsets"][1] > size - 8 - n:
                raise CorruptModel(f"{file}: truncated safetensors: tensor {name!r} ends past the end of the file")
            entries[name] = TensorEntry(name, file, str(info["dtype"]), tuple(int(d) for d in info["shape"]))
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as e:
        raise CorruptModel(f"{file}: malformed safetensors header ({type(e).__name__}: {e})") from None
    return entries


# --- as a weight source ---------------------------------------------------------------------------

QUANT_METHOD = "deskpod"  # quantization_config.quant_method of the models `deskpod quantize` writes
# The suffixes of a quantized module's tensors besides `.weight` (NVIDIA ModelOpt's naming)
SCHEME_PARTS = ("weight_scale", "weight_scale_2", "weight_min")

# Hugging Face module names -> canonical (llama.cpp's) names, inside model.layers.{i}. and at the top.
HF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    # Mixture-of-Experts: the router, and each expert's projections (llama.cpp stacks them: `ffn_gate_exps`,
    # whose expert e is canonically `ffn_gate_exps.e`)
    "mlp.gate": "ffn_gate_inp", "block_sparse_moe.gate": "ffn_gate_inp", "mlp.router": "ffn_gate_inp",
}
# expert e's module (inside model.layers.{i}.) -> its canonical name
HF_EXPERT_NAMES = {
    "mlp.experts.{e}.gate_proj": "ffn_gate_exps.{e}", "mlp.experts.{e}.up_proj": "ffn_up_exps.{e}",
    "mlp.experts.{e}.down_proj": "ffn_down_exps.{e}",
    "block_sparse_moe.experts.{e}.w1": "ffn_gate_exps.{e}", "block_sparse_moe.experts.{e}.w3": "ffn_up_exps.{e}",
    "block_sparse_moe.experts.{e}.w2": "ffn_down_exps.{e}",
}
_EXPERT = re.compile(r"(mlp\.experts|block_sparse_moe\.experts)\.(\d+)\.(\w+)")
HF_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# Gemma's blocks norm four times: its post_attention_layernorm comes after attention, not before the MLP.
_GEMMA_NAMES = {**HF_LAYER_NAMES, "post_attention_layernorm": "post_attention_norm"}
HF_ARCH_LAYER_NAMES = {"gemma2": _GEMMA_NAMES, "gemma3": _GEMMA_NAMES, "gemma3_text": _GEMMA_NAMES}
# Gemma's norms multiply by (1 + w) and store w; canonical norm weights are the factor itself.
NORM_OFFSET_ARCHS = frozenset({"gemma2", "gemma3", "gemma3_text"})
# Multimodal checkpoints nest the language model; their vision tower is not deskpod's to run (text only).
HF_NESTED = (("model.language_model.", "model."), ("language_model.model.", "model."), ("language_model.lm_head", "lm_head"))
HF_VISION = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.")
HF_DERIVED = (".rotary_emb.inv_freq",)  # buffers older transformers saved; recomputed from the config


def canonical_name(hf_name: str, architecture: str) -> str | None:
    """llama.cpp's name for a Hugging Face tensor name; the name itself when there is none (the loader then
    refuses it as unused), None for tensors that are not the language model's weights."""
    for nested, plain in HF_NESTED:
        if hf_name.startswith(nested):
            hf_name = plain + hf_name.removeprefix(nested)
    if hf_name.startswith(HF_VISION) or hf_name.endswith(HF_DERIVED):
        return None
    module, _, kind = hf_name.rpartition(".")
    if module in HF_GLOBAL_NAMES:
        return f"{HF_GLOBAL_NAMES[module]}.{kind}"
    parts = module.split(".", 3)
    names = HF_ARCH_LAYER_NAMES.get(architecture, HF_LAYER_NAMES)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] == "self_attn" and kind == "sinks":
        return f"blk.{parts[2]}.attn_sinks.weight"  # gpt-oss: a parameter of the module, not a .weight
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in names:
        return f"blk.{parts[2]}.{names[parts[3]]}.{kind}"
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and (expert := _EXPERT.fullmatch(parts[3])):
        pattern = f"{expert[1]}.{{e}}.{expert[3]}"
        if pattern in HF_EXPERT_NAMES:
            return f"blk.{parts[2]}.{HF_EXPERT_NAMES[pattern].format(e=expert[2])}.{kind}"
    return hf_name


def hf_module(canonical: str, architecture: str) -> str:
    """The Hugging Face module name of a canonical tensor name (without .weight/.bias): the inverse of
    canonical_name, for writing folders; names with no Hugging Face equivalent are kept as they are."""
    module = canonical.rsplit(".", 1)[0]
    top = {v: k for k, v in HF_GLOBAL_NAMES.items()}
    if module in top:
        return top[module]
    parts = module.split(".", 2)
    names = {v: k for k, v in reversed(HF_ARCH_LAYER_NAMES.get(architecture, HF_LAYER_NAMES).items())}
    if architecture == "mixtral":
        names["ffn_gate_inp"] = "block_sparse_moe.gate"
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in names:
        return f"model.layers.{parts[1]}.{names[parts[2]]}"
    if len(parts) == 3 and parts[0] == "blk" and (expert := re.fullmatch(r"(ffn_\w+_exps)\.(\d+)", parts[2])):
        prefix = "block_sparse_moe" if architecture == "mixtral" else "mlp"
        for hf, ours in HF_EXPERT_NAMES.items():
            if hf.startswith(prefix) and ours == f"{expert[1]}.{{e}}":
                return f"model.layers.{parts[1]}.{hf.format(e=expert[2])}"
    return module


@dataclass(frozen=True, eq=False, kw_only=True)
class SafetensorsFloatTensor(StoredTensor):
    folder: SafetensorsFolder
    stored_name: str
    offset: float = 0.0  # added on reading (Gemma's norms)

    @property
    def file_name(self) -> str:
        return self.stored_name

    def float(self):
        t = self._ordered(self.folder.get(self.stored_name).float())
        return t + self.offset if self.offset else t


# gpt-oss's fused experts: model.layers.{i}.mlp.experts.{gate_up_proj,down_proj}[_bias]
_FUSED_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_bias)?")
# each fused projection -> the canonical projections it holds and which of its outputs are each one's (gate and
# up interleave: outputs 0, 2, 4... are the gate's)
FUSED_EXPERT_PARTS = {"gate_up_proj": [("ffn_gate_exps", slice(0, None, 2)), ("ffn_up_exps", slice(1, None, 2))],
                      "down_proj": [("ffn_down_exps", slice(None))]}


@dataclass(frozen=True, eq=False, kw_only=True)
class FusedExpertTensor(StoredTensor):
    """One expert's projection out of a fused [experts, in, out] tensor: its columns `columns`, transposed."""

    folder: SafetensorsFolder
    stored_name: str
    expert: int
    columns: slice

    @property
    def file_name(self) -> str:
        return f"{self.stored_name}[{self.expert}]"

    def float(self):
        part = self.folder.get(self.stored_name)[self.expert].float()
        part = part[..., self.columns]
        return self._ordered(part if part.dim() == 1 else part.T.contiguous())


# gpt-oss as OpenAI publishes it: its experts in MXFP4, `<...>_blocks` [experts, out, in / 32, 16] (two E2M1
# codes a byte, the lower nibble first) and `<...>_scales` [experts, out, in / 32] (E8M0): deskpod's own mxfp4
# layout once the blocks of a row are laid end to end, so they are read as they are, never re-quantized
_MXFP4_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)_(blocks|scales)")
HF_MXFP4 = "mxfp4"  # quantization_config.quant_method of those checkpoints


@dataclass(frozen=True, eq=False, kw_only=True)
class Mxfp4ExpertTensor(SchemeTensor):
    """One expert's projection out of the fused MXFP4 tensors: its rows `picked` (gate and up interleave)."""

    folder: SafetensorsFolder
    stored_name: str  # the module: `<stored_name>_blocks`, `<stored_name>_scales`
    expert: int
    picked: slice

    @property
    def file_name(self) -> str:
        return f"{self.stored_name}_blocks[{self.expert}]"

    def parts(self):
        blocks = self.folder.get(f"{self.stored_name}_blocks")[self.expert][self.picked]
        scales = self.folder.get(f"{self.stored_name}_scales")[self.expert][self.picked]
        return {"weight": self._ordered(blocks.reshape(blocks.shape[0], -1)), "weight_scale": self._ordered(scales)}

    def float(self):
        raise TypeError(f"{self.name} is mxfp4: build a QuantizedTensor from its parts()")


@dataclass(frozen=True, eq=False, kw_only=True)
class SafetensorsSchemeTensor(SchemeTensor):
    folder: SafetensorsFolder
    stored_names: dict[str, str]  # part ("weight", "weight_scale", ...) -> tensor name in the folder

    @property
    def file_name(self) -> str:
        return self.stored_names["weight"]

    def parts(self):
        parts = {part: self.folder.get(name) for part, name in self.stored_names.items()}
        return {part: t if t.dim() == 0 else self._ordered(t) for part, t in parts.items()}

    def float(self):
        raise TypeError(f"{self.name} is {self.dtype}-quantized: build a QuantizedTensor from its parts()")


class SafetensorsWeights(WeightSource):
    """A Hugging Face folder as a weight source: float tensors, or modules quantized by `deskpod quantize`
    (`<module>.weight` + `.weight_scale` ...), renamed to llama.cpp's names."""

    format = "safetensors"

    def __init__(self, path: str | Path, label: str | None = None):
        from deskpod.formats.spec import SpecError, spec_from_hf_config

        self.folder = SafetensorsFolder(path)
        self.label = label = label or str(path)
        try:
            spec = spec_from_hf_config(self.folder.config, label)
        except SpecError as e:
            raise spec_error(label, "config.json", e) from None
        quant_method = (self.folder.config.get("quantization_config") or {}).get("quant_method")
        self.hf_mxfp4 = quant_method == HF_MXFP4 and spec.architecture == "gpt_oss"  # only its experts are packed
        self.schemes = {} if self.hf_mxfp4 else _schemes(self.folder.config, label)
        tensors = self._tensors_by_name(spec.architecture)
        # tied or not is what the tensors say: transformers 4 leaves tie_word_embeddings out of Gemma's configs
        spec = replace(spec, tied_embeddings="output.weight" not in tensors)
        super().__init__(label, spec, tensors)

    def _tensors_by_name(self, architecture: str) -> dict[str, StoredTensor]:
        offset = 1.0 if architecture in NORM_OFFSET_ARCHS else 0.0
        tensors: dict[str, StoredTensor] = {}
        for hf_name, entry in self.folder.entries.items():
            fused = _FUSED_EXPERTS.fullmatch(hf_name)
            if fused and entry.dtype in FLOAT_DTYPES:
                tensors.update(self._fused_experts(fused, entry))
                continue
            packed = _MXFP4_EXPERTS.fullmatch(hf_name)
            if packed and self.hf_mxfp4:
                if packed[3] == "blocks":
                    tensors.update(self._mxfp4_experts(packed, entry))
                continue
            name = canonical_name(hf_name, architecture)
            if name is None or hf_name.rpartition(".")[2] in SCHEME_PARTS:
                continue
            if self.folder.has(hf_name + "_scale"):  # "<module>.weight" with "<module>.weight_scale" beside it
                tensors[name] = self._scheme_tensor(hf_name, name, entry)
            elif entry.dtype not in FLOAT_DTYPES:  # codes of some other quantization: their values mean nothing alone
                raise UnsupportedModel(f"{self.label}: tensor {hf_name} is {entry.dtype} with no scales beside it "
                                       "(a quantization deskpod does not read)")
            else:
                norm = offset if name.endswith("norm.weight") else 0.0
                tensors[name] = SafetensorsFloatTensor(name, entry.shape, entry.dtype, entry.n_bytes, folder=self.folder,
                                                       stored_name=hf_name, offset=norm)
        return tensors

    def _fused_experts(self, match: re.Match, entry: TensorEntry) -> dict[str, StoredTensor]:
        """gpt-oss's experts, stored fused and transposed ([experts, in, out]) with gate and up interleaved
        (columns 0, 2, 4... gate; 1, 3, 5... up): per expert, the canonical [out, in] gate, up and down."""
        layer, kind, bias = match[1], match[2], match[3]
        experts = entry.shape[0]
        parts = FUSED_EXPERT_PARTS[kind]
        found = {}
        for e in range(experts):
            for canonical, columns in parts:
                name = f"blk.{layer}.{canonical}.{e}.{'bias' if bias else 'weight'}"
                width = len(range(entry.shape[-1])[columns])
                shape = (width,) if bias else (width, entry.shape[1])
                found[name] = FusedExpertTensor(name, shape, entry.dtype, entry.n_bytes // experts // len(parts),
                                                folder=self.folder, stored_name=match[0], expert=e, columns=columns)
        return found

    def _mxfp4_experts(self, match: re.Match, entry: TensorEntry) -> dict[str, StoredTensor]:
        """gpt-oss's MXFP4 experts: per expert, the canonical [out, in] gate, up (rows 0, 2, 4... and 1, 3, 5...
        of gate_up) and down, each in its own blocks."""
        layer, kind = match[1], match[2]
        module = match[0].removesuffix("_blocks")
        scales = self.folder.entries.get(f"{module}_scales")
        experts, rows, groups, width = entry.shape
        if entry.dtype != "U8" or width != 16 or scales is None or scales.shape != (experts, rows, groups):
            raise CorruptModel(f"{self.label}: {module}_blocks {list(entry.shape)} ({entry.dtype}) and its _scales "
                               f"{list(scales.shape) if scales else 'missing'} are not MXFP4's [experts, out, in/32, 16] "
                               f"uint8 and [experts, out, in/32]")
        parts = FUSED_EXPERT_PARTS[kind]
        nbytes = (entry.n_bytes + scales.n_bytes) // experts // len(parts)
        found = {}
        for e in range(experts):
            for canonical, picked in parts:
                name = f"blk.{layer}.{canonical}.{e}.weight"
                shape = (len(range(rows)[picked]), groups * 32)
                found[name] = Mxfp4ExpertTensor(name, shape, "mxfp4", nbytes, folder=self.folder, stored_name=module,
                                                expert=e, picked=picked)
        return found

    def _scheme_tensor(self, hf_name: str, name: str, entry: TensorEntry) -> StoredTensor:
        module = hf_name.removesuffix(".weight")
        stored = {"weight": hf_name, **{p: f"{module}.{p}" for p in SCHEME_PARTS if self.folder.has(f"{module}.{p}")}}
        scheme = self.schemes.get(module, self.schemes.get(""))
        if scheme is None:
            raise CorruptModel(f"{self.label}: {module} is quantized but quantization_config names no scheme for it")
        nbytes = sum(self.folder.entries[n].n_bytes for n in stored.values())
        return SafetensorsSchemeTensor(name, entry.shape, scheme, nbytes, folder=self.folder, stored_names=stored)


def _schemes(config: dict[str, Any], label: str) -> dict[str, str]:
    """quantization_config -> {module: scheme}, the default under ""; {} for a float model."""
    quant = config.get("quantization_config")
    if not quant:
        return {}
    if quant.get("quant_method") != QUANT_METHOD:
        raise UnsupportedModel(
            f"{label}: quantization method {quant.get('quant_method')!r} is not supported; deskpod runs float "
            f"safetensors models and those written by `deskpod quantize` (quant_method {QUANT_METHOD!r})"
        )
    overrides = {m: s for m, s in (quant.get("overrides") or {}).items()}
    return {"": quant["scheme"], **overrides} if quant.get("scheme") else overrides
