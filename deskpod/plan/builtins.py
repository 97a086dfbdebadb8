"""Published model configurations the planner knows by name, each with its source.

Numbers are copied from each model's config.json on Hugging Face (the URL in `source`); the
parameter counts they give match the published ones (Llama 3.1 8B → 8.03 B, gpt-oss-120b → 116.8 B
total / 5.1 B active, Qwen3-235B-A22B → 235 B / 22 B).
"""

from __future__ import annotations

import difflib

from deskpod.plan.shape import ModelShape

_HF = "https://huggingface.co/{}/blob/main/config.json"


def _llama31(name: str, repo: str, layers: int, hidden: int, heads: int, ffn: int) -> ModelShape:
    return ModelShape(name, "llama", layers, hidden, heads, 8, 128, ffn, 128_256, 131_072,
                      source=_HF.format(repo))


BUILTINS: dict[str, ModelShape] = {
    s.name: s
    for s in (
        _llama31("llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct", 32, 4096, 32, 14_336),
        _llama31("llama-3.1-70b", "meta-llama/Llama-3.1-70B-Instruct", 80, 8192, 64, 28_672),
        _llama31("llama-3.1-405b", "meta-llama/Llama-3.1-405B-Instruct", 126, 16_384, 128, 53_248),
        ModelShape("qwen3-14b", "qwen3", 40, 5120, 40, 8, 128, 17_408, 151_936, 40_960,
                   source=_HF.format("Qwen/Qwen3-14B")),
        ModelShape("qwen3-235b-a22b", "qwen3_moe", 94, 4096, 64, 4, 128, 1536, 151_936, 40_960,
                   num_experts=128, experts_per_token=8, source=_HF.format("Qwen/Qwen3-235B-A22B")),
        ModelShape("qwen3-30b-a3b", "qwen3_moe", 48, 2048, 32, 4, 128, 768, 151_936, 40_960,
                   num_experts=128, experts_per_token=8, source=_HF.format("Qwen/Qwen3-30B-A3B")),
        # gpt-oss: alternate layers attend to a 128-token window (config.json `layer_types`).
        ModelShape("gpt-oss-20b", "gpt-oss", 24, 2880, 64, 8, 64, 2880, 201_088, 131_072,
                   num_experts=32, experts_per_token=4, sliding_window=128, sliding_layers=12,
                   source=_HF.format("openai/gpt-oss-20b")),
        ModelShape("gpt-oss-120b", "gpt-oss", 36, 2880, 64, 8, 64, 2880, 201_088, 131_072,
                   num_experts=128, experts_per_token=4, sliding_window=128, sliding_layers=18,
                   source=_HF.format("openai/gpt-oss-120b")),
        ModelShape("smollm2", "llama", 30, 576, 9, 3, 64, 1536, 49_152, 8192, tied_embeddings=True,
                   source=_HF.format("HuggingFaceTB/SmolLM2-135M-Instruct")),
        # Used by benchmarks/plan_accuracy.py to compare with published measurements.
        ModelShape("llama-2-7b", "llama", 32, 4096, 32, 32, 128, 11_008, 32_000, 4096,
                   source=_HF.format("meta-llama/Llama-2-7b-hf")),
        ModelShape("qwen2.5-7b", "qwen2", 28, 3584, 28, 4, 128, 18_944, 152_064, 32_768,
                   source=_HF.format("Qwen/Qwen2.5-7B-Instruct")),
        # Gemma 3: five local (1024-token window) layers to one global.
        ModelShape("gemma-3-4b", "gemma3", 34, 2560, 8, 4, 256, 10_240, 262_208, 131_072,
                   tied_embeddings=True, sliding_window=1024, sliding_layers=29,
                   source=_HF.format("google/gemma-3-4b-it")),
    )
}

# Precision of the published checkpoint when it is not bf16.
NATIVE_PRECISION = {"gpt-oss-20b": "mxfp4", "gpt-oss-120b": "mxfp4"}

ALIASES = {
    "smollm2-135m": "smollm2",
    "smollm2-135m-instruct": "smollm2",
    "llama3.1-8b": "llama-3.1-8b",
    "llama3.1-70b": "llama-3.1-70b",
    "llama3.1-405b": "llama-3.1-405b",
}


def get_builtin(name: str) -> ModelShape | None:
    key = name.lower()
    return BUILTINS.get(ALIASES.get(key, key))


def builtin_names() -> list[str]:
    return list(BUILTINS)


def close_builtins(name: str) -> list[str]:
    """Built-in names (aliases resolved) that look like `name`, best first."""
    close = difflib.get_close_matches(name.lower(), [*BUILTINS, *ALIASES], n=8, cutoff=0.5)
    return list(dict.fromkeys(ALIASES.get(c, c) for c in close))[:5]
