"""Loading a model and reading its logits, as the engine's tests do."""

from __future__ import annotations

from pathlib import Path

import torch

from deskpod.engine.config import EngineConfig
from deskpod.engine.loader import LoadedModel, kv_torch_dtype, load_model
from deskpod.engine.models.layers import KVCache


def load(path: Path | str, weights: str = "compact", name: str | None = None, **settings) -> LoadedModel:
    """load_model with these EngineConfig settings; `name` is how errors call the model."""
    return load_model(path, EngineConfig(weights=weights, **settings), name=name)


def kv_cache(lm: LoadedModel, tokens: int, kv_cache_dtype: str = "auto") -> KVCache:
    """A one-sequence cache in the type the engine keeps for this model (auto: float16 for compact weights)."""
    return KVCache(lm.spec, tokens, dtype=kv_torch_dtype(EngineConfig(weights=lm.weights, kv_cache_dtype=kv_cache_dtype)))


def logits_of(lm: LoadedModel, ids: list[int], chunks: list[int] | None = None,
              kv_cache_dtype: str = "auto") -> torch.Tensor:
    """Logits [len(ids), vocab] of one sequence fed in pieces of the given sizes (all at once by default), with
    the KV cache the engine would keep."""
    cache, out, start = kv_cache(lm, len(ids), kv_cache_dtype), [], 0
    for n in chunks or [len(ids)]:
        piece = torch.tensor(ids[start : start + n])
        out.append(lm.model(piece, torch.arange(start, start + len(piece)), cache, all_logits=True))
        start += n
    assert start == len(ids), f"chunks {chunks} do not add up to {len(ids)} tokens"
    return torch.cat(out)
