"""Turn the MODEL argument of `deskpod plan` into a shape (and, from a file, its exact weight bytes).

MODEL is tried as, in order: a file or folder (a GGUF, a config.json, a folder holding one), a model
in the store, a built-in name, a bare size such as `200b`. Files are read for metadata only.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from deskpod.errors import CorruptModel, DeskpodError, ModelNotFound, UnsupportedModel
from deskpod.formats.gguf import GGUF_MAGIC, GGUFFile
from deskpod.formats.spec import SpecError, spec_from_gguf
from deskpod.plan.builtins import NATIVE_PRECISION, builtin_names, close_builtins, get_builtin
from deskpod.plan.precision import GGUF_FILE_TYPES
from deskpod.plan.shape import InvalidPlanInput, ModelShape
from deskpod.plan.weights import WeightBytes


@dataclass(frozen=True)
class ModelSource:
    shape: ModelShape
    origin: str  # how MODEL was understood, for the report
    weights: WeightBytes | None = None  # exact, when read from a file's tensors
    precision: str | None = None  # the file's own scheme (a deskpod.plan.precision name) if known
    file_type: str | None = None  # the file's own label, e.g. "Q4_1", "Q4_K_M"


def resolve(spec: str) -> ModelSource:
    for resolver in RESOLVERS:
        found = resolver(spec)
        if found is not None:
            return found
    raise ModelNotFound(unknown_model_message(spec))


def unknown_model_message(spec: str) -> str:
    close = close_builtins(spec) + difflib.get_close_matches(spec.lower(), store_names(), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return (f"unknown model {spec!r}: not a file, a store model, a built-in name or a size like 200b."
            f"{hint} Built-in models: {', '.join(builtin_names())}.")


# -- files --------------------------------------------------------------------------------------


def _from_path(spec: str) -> ModelSource | None:
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return read_hf_config(path / "config.json")
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return read_gguf(ggufs[0])
        raise InvalidPlanInput(f"{path} holds no config.json and not exactly one .gguf file")
    if path.is_file():
        if path.suffix == ".gguf" or _is_gguf(path):  # a store blob has no suffix
            return read_gguf(path)
        if path.suffix == ".json":
            return read_hf_config(path)
        raise UnsupportedModel(f"{path}: the planner reads .gguf files and Hugging Face config.json")
    if path.suffix in (".gguf", ".json"):
        raise InvalidPlanInput(f"{path} does not exist")
    return None


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def read_hf_config(path: Path, name: str | None = None) -> ModelSource:
    if not path.is_file():
        raise InvalidPlanInput(f"{path} does not exist")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InvalidPlanInput(f"cannot read {path}: {err}") from err
    if not isinstance(config, dict):
        raise InvalidPlanInput(f"{path} is not a config.json object")
    name = name or (path.parent.name if path.name == "config.json" else path.stem)
    shape = ModelShape.from_hf_config(config, name=name, source=str(path))
    return ModelSource(shape, f"config.json {path}", precision=_hf_precision(config))


# `deskpod quantize` schemes -> the planner's (int8 per 32 with an fp16 scale is Q8_0's 8.5 bits)
DESKPOD_SCHEMES = {"fp8": "fp8", "fp8_e5m2": "fp8", "nvfp4": "nvfp4", "mxfp4": "mxfp4", "int4": "int4", "int8": "q8_0"}


def _hf_precision(config: dict) -> str | None:
    quant = config.get("quantization_config") or {}
    method = str(quant.get("quant_method", "")).lower()
    if method == "deskpod":
        return DESKPOD_SCHEMES.get(str(quant.get("scheme")))
    algo = str(quant.get("quant_algo", "")).lower()
    if method in ("mxfp4", "fp8") or algo in ("nvfp4", "fp8"):
        return algo or method
    if method in ("awq", "gptq") and quant.get("bits") == 4:
        return "int4"
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "")
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "f32"}.get(dtype)


def read_gguf(path: Path, name: str | None = None) -> ModelSource:
    """Shape and exact tensor bytes from a GGUF's header (memory-mapped; weights are not read)."""
    from gguf import LlamaFileType

    try:
        model = GGUFFile(path)
    except CorruptModel as err:  # its message names the file and what is wrong with it
        raise InvalidPlanInput(f"cannot read GGUF {err}") from err
    tied = not model.has_tensor("output.weight")
    try:
        spec = spec_from_gguf(model.metadata, not tied, str(path))
    except SpecError as err:
        raise UnsupportedModel(f"{path}: not a decoder LLM the planner knows ({err})") from None
    shape = ModelShape.from_spec(spec, name or path.stem, str(path))
    file_type = model.metadata.get("general.file_type")
    file_type = file_type if isinstance(file_type, int) else None  # a damaged file may hold anything here
    known = {t.value: t.name.removeprefix("MOSTLY_") for t in LlamaFileType}
    return ModelSource(shape, f"GGUF {path}", weights=gguf_weight_bytes(model, tied),
                       precision=GGUF_FILE_TYPES.get(file_type), file_type=known.get(file_type))


def gguf_weight_bytes(model: GGUFFile, tied: bool) -> WeightBytes:
    """Sum a GGUF's tensors by role, from their names."""
    parts = {"embedding": 0, "head": 0, "dense": 0, "experts": 0}
    for tensor in model.tensors():
        parts[_tensor_role(tensor.name)] += tensor.n_bytes
    return WeightBytes(**parts, tied=tied)


def _tensor_role(name: str) -> str:
    if name == "token_embd.weight":
        return "embedding"
    if name == "output.weight":
        return "head"
    return "experts" if "_exps" in name else "dense"


# -- the store, built-ins, sizes ----------------------------------------------------------------


def _from_store(spec: str) -> ModelSource | None:
    try:
        from deskpod.store import Store
    except ImportError:  # the store is not there yet
        return None
    store = Store()
    try:
        manifest = store.get(spec)
    except DeskpodError:  # not a store name, or not in the store
        return None
    if manifest.format == "gguf":
        found = read_gguf(store.model_file(manifest), name=spec)
    elif manifest.format == "safetensors":
        found = read_hf_config(store.model_dir(manifest) / "config.json", name=spec)
    else:
        raise UnsupportedModel(f"{spec} is a {manifest.format} model, not an LLM the planner sizes")
    return replace(found, origin=f"store model {manifest.ref}")


def store_names() -> list[str]:
    try:
        from deskpod.store import Store

        return [str(getattr(m, "name", m)) for m in Store().list()]
    except Exception:  # noqa: BLE001 - suggestions are best effort; a missing store means none
        return []


def _from_builtin(spec: str) -> ModelSource | None:
    shape = get_builtin(spec)
    if shape is None:
        return None
    return ModelSource(shape, f"built-in {shape.name} ({shape.source})", precision=NATIVE_PRECISION.get(shape.name))


SIZE = re.compile(r"^\s*([-+]?\d*\.?\d+)\s*([kmbt])\s*$", re.IGNORECASE)
UNITS = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}
# Smallest and largest sizes the Llama-shaped scaling rule is meant for.
SIZE_RANGE = (1e7, 1e14)


def _from_size(spec: str) -> ModelSource | None:
    match = SIZE.match(spec)
    if not match:
        return None
    params = float(match.group(1)) * UNITS[match.group(2).lower()]
    low, high = SIZE_RANGE
    if not low <= params <= high:
        raise InvalidPlanInput(f"model size {spec!r} is not a size the planner can shape: give a positive "
                               f"parameter count between {low / 1e6:g}m and {high / 1e12:g}t, e.g. 200b")
    shape = ModelShape.dense_of_size(params, name=spec.strip().lower())
    return ModelSource(shape, f"dense Llama-shaped model of {params / 1e9:g} B parameters")


RESOLVERS: tuple[Callable[[str], ModelSource | None], ...] = (_from_path, _from_store, _from_builtin, _from_size)
