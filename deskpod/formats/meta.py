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
from deskpod.formats.safetensors import read_config, read_header, weight_files
from deskpod.formats.spec import ModelSpec, SpecError, spec_from_gguf, spec_from_hf_config


@dataclass(frozen=True)
class ModelMeta:
    format: str  # "gguf" | "safetensors" | "onnx"
    architecture: str  # "llama", "gemma3", "bert", "onnx", ...
    parameters: int  # total parameter count (0 when unknown)
    quantization: str  # "Q4_1", "Q4_K_M", "F32", "BF16", "mixed", "unknown"
    context_length: int  # 0 when not applicable
    spec: ModelSpec | None = None  # what the engine and the planner read of it; None when not a transformer LM
    spec_problem: str = ""  # why there is no spec


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


def _read_gguf(path: Path) -> ModelMeta:
    model = GGUFFile(path)  # CorruptModel naming the file when it is truncated or damaged
    counts: Counter[str] = Counter()
    for tensor in model.tensors():
        counts[tensor.ggml_type] += tensor.n_elements
    spec, problem = _spec_or_none(lambda: spec_from_gguf(model.metadata, model.has_tensor("output.weight"), str(path)))
    return ModelMeta(
        format="gguf",
        architecture=model.architecture,
        parameters=sum(counts.values()),
        quantization=_gguf_quantization(model.metadata.get("general.file_type"), counts),
        context_length=spec.max_context if spec else _as_int(model.arch_value("context_length")),
        spec=spec,
        spec_problem=problem,
    )


def _gguf_quantization(file_type: Any, counts: Counter[str]) -> str:
    """The file type llama.cpp recorded ("Q4_K_M"), else the tensor type holding most parameters."""
    known = {t.value for t in gguf.LlamaFileType} - {gguf.LlamaFileType.GUESSED.value}
    if isinstance(file_type, int) and file_type in known:
        return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    return _dominant(counts.items())


# --- safetensors ----------------------------------------------------------------------------------

# config.json's context length under the names model families give it, first present wins
HF_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def _read_safetensors(path: Path) -> ModelMeta:
    weights = weight_files(path) if path.is_dir() else [path]
    config = read_config(path) if path.is_dir() else {}
    spec, problem = _spec_or_none(lambda: spec_from_hf_config(config, str(path))) if config else (None, "no config.json")
    counts: Counter[str] = Counter()
    for file in weights:
        for dtype, n in _safetensors_counts(file).items():
            counts[dtype] += n
    quant = config.get("quantization_config")
    quant = quant if isinstance(quant, dict) else {}
    quant_method = quant.get("scheme") or quant.get("quant_method")  # deskpod quantize records its scheme
    return ModelMeta(
        format="safetensors",
        architecture=str(config.get("model_type") or "unknown"),
        parameters=_as_int(quant.get("parameters")) or sum(counts.values()),  # packed codes hide the true count
        quantization=str(quant_method).upper() if quant_method else _dominant(counts.items()),
        context_length=spec.max_context if spec else _hf_context(config),
        spec=spec,
        spec_problem=problem,
    )


def _hf_context(config: dict[str, Any]) -> int:
    text = config.get("text_config")
    merged = {**config, **text} if isinstance(text, dict) else config  # multimodal configs nest the LLM
    return _as_int(next((merged[k] for k in HF_CONTEXT_KEYS if k in merged), 0))


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
    """A count from metadata: GGUF values may be per-layer lists (the largest one); anything that is not a
    number counts as 0 (unknown)."""
    if isinstance(value, list):
        return max((_as_int(v) for v in value), default=0)
    try:
        return int(value or 0)
    except (TypeError, ValueError, OverflowError):
        return 0


def _spec_or_none(read: Callable[[], ModelSpec]) -> tuple[ModelSpec | None, str]:
    """(the model's spec, ""), or (None, why) when it is not a transformer LM the readers understand (an
    embedding model's config, say)."""
    try:
        return read(), ""
    except SpecError as e:
        return None, str(e)


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
