"""Engine fixtures: the real SmolLM2 loaded once per session (both weight modes), llama.cpp's recorded
greedy outputs for it, and a tiny random Llama GGUF with a real byte-level BPE vocabulary
(tests/support/tiny_llama.py)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from support.tiny_llama import TOKENS, write_tiny_llama

from deskpod.engine.config import EngineConfig
from deskpod.engine.loader import LoadedModel, load_model
from deskpod.engine.tokenizer import Tokenizer
from deskpod.formats.gguf import GGUFFile

REFERENCE = Path(__file__).parents[1] / "data" / "smollm2-greedy.json"

# --- the real model -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def reference() -> dict:
    """llama.cpp's greedy results for SmolLM2 Q4_1 (2 prompts x chat/raw), with transformers' float32 beside them."""
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf(GGUFFile(smollm2_gguf))


@pytest.fixture(scope="session")
def smollm2_compact(smollm2_gguf: Path) -> LoadedModel:
    return load_model(smollm2_gguf, EngineConfig(weights="compact"))


@pytest.fixture(scope="session")
def smollm2_float32(smollm2_gguf: Path) -> LoadedModel:
    return load_model(smollm2_gguf, EngineConfig(weights="float32"))


@pytest.fixture(scope="session")
def make_tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """write_tiny_llama into a fresh folder: make_tiny_llama(arch="gemma3") -> path."""
    return lambda **options: write_tiny_llama(tmp_path_factory.mktemp("tiny_llama") / "tiny-llama.gguf", **options)


@pytest.fixture(scope="session")
def tiny_tokens() -> list[str]:
    """The tiny model's vocabulary, in id order."""
    return list(TOKENS)


@pytest.fixture(scope="session")
def tiny_llama_gguf(make_tiny_llama: Callable[..., Path]) -> Path:
    return make_tiny_llama()


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """2 shared cores in CI: one intra-op thread keeps timings steady and results independent of scheduling."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
