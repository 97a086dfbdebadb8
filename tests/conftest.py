"""Shared fixtures: a session model store under a temp $DESKPOD_HOME, real catalog models, tiny model files."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from deskpod.store import Store


@pytest.fixture(scope="session")
def store_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("deskpod_home")


@pytest.fixture(scope="session", autouse=True)
def _deskpod_home_env(store_home: Path) -> Iterator[None]:
    """Nothing in the tests touches ~/.deskpod: Store() and the CLI default to the session store."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DESKPOD_HOME", str(store_home))
        yield


@pytest.fixture(scope="session")
def store(store_home: Path) -> Store:
    """The session store (shared: do not remove or corrupt its models; use Store(tmp_path) for that)."""
    return Store(store_home)


@pytest.fixture(scope="session")
def smollm2_gguf(store: Store) -> Path:
    """SmolLM2-135M-Instruct Q4_1 pulled once per session from the catalog; the GGUF blob's path."""
    return store.model_file(store.pull("smollm2", progress=False))


@pytest.fixture(scope="session")
def minilm_dir(store: Store) -> Path:
    """all-MiniLM-L6-v2 pulled once per session; a folder with config.json, tokenizer.json, model.safetensors..."""
    return store.model_dir(store.pull("minilm", progress=False))


# --- tiny models built on the spot --------------------------------------------------------------


@pytest.fixture
def float32_gemm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompt-sized GEMMs in float32 (deskpod.quant.ggml.GEMM_DTYPE), on CPUs that would take them in bfloat16 too:
    for checks exact to float32 rounding, or of something else than a GEMM's rounding."""
    import torch

    from deskpod.quant import ggml

    monkeypatch.setattr(ggml, "GEMM_DTYPE", torch.float32)


def write_tiny_gguf(path: Path, file_type: gguf.LlamaFileType | None = None) -> Path:
    """A 2-layer llama-shaped GGUF of a few KB: 16 hidden, 4 heads, 2 kv heads, 10-token vocab."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_block_count(2)
    writer.add_embedding_length(16)
    writer.add_feed_forward_length(32)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(10)])
    writer.add_tensor("token_embd.weight", np.ones((10, 16), dtype=np.float32))  # 160 F32
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((32, 16), dtype=np.float16))  # 512 F16
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_hf_folder(folder: Path) -> Path:
    """A Hugging Face-style folder: config.json, tokenizer files, model.safetensors, a nested module config."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "bert",
        "num_hidden_layers": 2,
        "hidden_size": 8,
        "num_attention_heads": 2,
        "intermediate_size": 16,
        "vocab_size": 12,
        "max_position_embeddings": 64,
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    tensors = {"embeddings.weight": np.ones((12, 8), np.float32), "pooler.bias": np.zeros(8, np.float32)}
    save_file(tensors, str(folder / "model.safetensors"))  # 104 parameters
    return folder


@pytest.fixture
def make_tiny_gguf() -> Callable[..., Path]:
    return write_tiny_gguf


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "Tiny-Llama.Q0.gguf")


@pytest.fixture
def tiny_hf_dir(tmp_path: Path) -> Path:
    return write_tiny_hf_folder(tmp_path / "Tiny-BERT")


@pytest.fixture
def tiny_onnx(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.onnx"
    path.write_bytes(b"\x08\x07\x12\x07deskpod")  # any non-empty bytes: deskpod reads no ONNX metadata
    return path
