"""The architecture registry: GGUF `general.architecture` and config.json `model_type` -> the file that
builds that architecture (deskpod/engine/models/<file>.py, which defines ARCHITECTURE).

Imported lazily and free of torch, so the store can tell at `deskpod pull` whether the engine runs a model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from deskpod.errors import UnsupportedModel

if TYPE_CHECKING:
    from deskpod.engine.models.builder import ModelBuilder
    from deskpod.engine.models.layers import DecoderLM
    from deskpod.formats.spec import ModelSpec

# file name -> the names files give that architecture (GGUF writes Mistral as "llama"; config.json says "mistral")
FILES: dict[str, tuple[str, ...]] = {
    "llama": ("llama", "mistral", "mixtral"),  # GGUF writes Mixtral as "llama" with experts too
    "qwen2": ("qwen2",),
    "qwen3": ("qwen3", "qwen3_moe", "qwen3moe"),
    "gemma3": ("gemma3", "gemma3_text"),
    "gemma2": ("gemma2",),
    "olmoe": ("olmoe",),
    "gpt_oss": ("gpt_oss", "gpt-oss"),
}
REGISTRY: dict[str, str] = {name: file for file, names in FILES.items() for name in names}


@dataclass(frozen=True)
class Architecture:
    name: str  # how messages call it
    # ModelSpec.features() keys it implements; a model using any other feature is refused by name
    supports: frozenset[str]
    build: Callable[[ModelBuilder], DecoderLM]


def architecture(name: str, label: str = "") -> Architecture:
    """The architecture a file names; UnsupportedModel naming the model and listing what deskpod runs."""
    if name not in REGISTRY:
        raise UnsupportedModel(
            f"{label or 'this model'}: architecture {name!r} is not supported by deskpod's engine "
            f"(supported: {', '.join(sorted(REGISTRY))})"
        )
    return importlib.import_module(f"deskpod.engine.models.{REGISTRY[name]}").ARCHITECTURE


def check_runnable(spec: ModelSpec, label: str) -> Architecture:
    """The architecture that runs `spec`, after checking it implements every feature the model uses;
    UnsupportedModel naming the model and each feature otherwise."""
    arch = architecture(spec.architecture, label)
    missing = [text for key, text in spec.features().items() if key not in arch.supports]
    if missing:
        raise UnsupportedModel(
            f"{label}: this {spec.architecture} model uses {', '.join(missing)}, which deskpod's "
            f"{arch.name} implementation does not support"
        )
    return arch
