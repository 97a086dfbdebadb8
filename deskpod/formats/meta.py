"""What deskpod knows about a model without loading its weights."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from deskpod.errors import CorruptModel, ModelNotFound, UnsupportedModel
from deskpod.formats.gguf import GGUF_MAGIC, GGUFFile
from deskpod.formats.safetensors import read_config, read_header


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


def read_meta(path: str | Path) -> ModelMeta:
    """Read a model's metadata (never its weights): a .gguf file, a safetensors folder or file, an .onnx file.

    Works on store blobs too (no suffix): GGUF is recognised by its magic bytes.
    Raises CorruptModel naming the file when it is truncated or damaged.
    """
    path = Path(path)
    if not path.exists():
        raise ModelNotFound(f"{path} does not exist")
    path = _single_file(path)
    return READERS[_detect(path)](path)


def _single_file(path: Path) -> Path:
    """A folder with no config.json holding one .gguf or .onnx (a store snapshot) stands for that file."""
    if not path.is_dir() or (path / "config.json").exists():
        return path
    singles = [p for p in path.iterdir() if p.suffix in (".gguf", ".onnx")]
    return singles[0] if len(singles) == 1 else path


def _detect(path: Path) -> str:
    if path.is_dir():
        return "safetensors"
    if path.suffix in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[path.suffix]
    with path.open("rb") as f:
        if f.read(len(GGUF_MAGIC)) == GGUF_MAGIC:
            return "gguf"
    raise UnsupportedModel(
        f"{path}: unknown model format; deskpod reads .gguf files, .onnx files and "
        "Hugging Face folders (config.json + *.safetensors)"
    )


# --- GGUF -------------------------------------------------------------------------------------

# ModelMeta field -> GGUF key after "<architecture>."
GGUF_KEYS = {
    "context_length": "context_length",
    "num_layers": "block_count",
    "hidden_size": "embedding_length",
    "num_heads": "attention.head_count",
    "num_kv_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length",
    "intermediate_size": "feed_forward_length",
}


def _read_gguf(path: Path) -> ModelMeta:
    model = GGUFFile(path)  # CorruptModel naming the file when it is truncated or damaged
    shape = {field: _as_int(model.arch_value(key)) for field, key in GGUF_KEYS.items()}
    tokens = model.metadata.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens is not None else _as_int(model.arch_value("vocab_size"))
    counts: Counter[str] = Counter()
    for tensor in model.tensors():
        counts[tensor.ggml_type] += tensor.n_elements
    return ModelMeta(
        format="gguf",
        architecture=model.architecture,
        parameters=sum(counts.values()),
        quantization=_gguf_quantization(model.metadata.get("general.file_type"), counts),
        vocab_size=vocab,
        **_with_derived_heads(shape),
    )


def _gguf_quantization(file_type: Any, counts: Counter[str]) -> str:
    """The file type llama.cpp recorded ("Q4_K_M"), else the tensor type holding most parameters."""
    known = {t.value for t in gguf.LlamaFileType} - {gguf.LlamaFileType.GUESSED.value}
    if isinstance(file_type, int) and file_type in known:
        return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    return _dominant(counts.items())


# --- safetensors ----------------------------------------------------------------------------------

# ModelMeta field -> config.json keys, first present wins (names differ between model families)
HF_KEYS = {
    "context_length": ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"),
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_heads": ("num_attention_heads", "n_head"),
    "num_kv_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim"),
    "vocab_size": ("vocab_size",),
}


def _read_safetensors(path: Path) -> ModelMeta:
    weights = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not weights:
        raise UnsupportedModel(f"{path}: no *.safetensors weights in this folder")
    config = read_config(path) if path.is_dir() else {}
    text = {**config, **(config.get("text_config") or {})}  # multimodal configs nest the LLM
    counts: Counter[str] = Counter()
    for file in weights:
        for dtype, n in _safetensors_counts(file).items():
            counts[dtype] += n
    shape = {field: _as_int(next((text[k] for k in keys if k in text), 0)) for field, keys in HF_KEYS.items()}
    quant = config.get("quantization_config") or {}
    quant_method = quant.get("scheme") or quant.get("quant_method")  # deskpod quantize records its scheme
    return ModelMeta(
        format="safetensors",
        architecture=str(config.get("model_type") or "unknown"),
        parameters=int(quant.get("parameters") or sum(counts.values())),  # packed codes hide the true count
        quantization=str(quant_method).upper() if quant_method else _dominant(counts.items()),
        **_with_derived_heads(shape),
    )


def _safetensors_counts(file: Path) -> Counter[str]:
    """Parameter count per dtype, from the header alone (no tensor bytes read)."""
    counts: Counter[str] = Counter()
    for entry in read_header(file).values():
        counts[entry.dtype] += math.prod(entry.shape)
    return counts


# --- ONNX -----------------------------------------------------------------------------------------


def _read_onnx(path: Path) -> ModelMeta:
    if path.stat().st_size == 0:
        raise CorruptModel(f"{path}: empty ONNX file")
    return ModelMeta(format="onnx", architecture="onnx", parameters=0, quantization="unknown", context_length=0)


# --- shared ---------------------------------------------------------------------------------------


def _as_int(value: Any) -> int:
    """GGUF and config values may be per-layer lists (e.g. head counts); the largest one sizes memory."""
    if isinstance(value, list):
        return max((int(v) for v in value), default=0)
    return int(value or 0)


def _with_derived_heads(shape: dict[str, int]) -> dict[str, int]:
    heads = shape["num_heads"]
    return {
        **shape,
        "num_kv_heads": shape["num_kv_heads"] or heads,
        "head_dim": shape["head_dim"] or (shape["hidden_size"] // heads if heads else 0),
    }


def _dominant(counts: Any) -> str:
    """The dtype holding the most parameters; 'unknown' when there are none."""
    best = max(counts, key=lambda item: item[1], default=None)
    return best[0] if best else "unknown"


READERS: dict[str, Callable[[Path], ModelMeta]] = {
    "gguf": _read_gguf,
    "safetensors": _read_safetensors,
    "onnx": _read_onnx,
}
SUFFIX_FORMATS = {".gguf": "gguf", ".onnx": "onnx", ".safetensors": "safetensors"}
