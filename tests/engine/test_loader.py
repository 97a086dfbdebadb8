"""load_gguf: config from metadata, weights compact or float32, and clear refusals."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from deskpod.engine.loader import ARCHITECTURES, load_gguf
from deskpod.errors import CorruptModel, UnsupportedModel


def test_config_comes_from_metadata(tiny_llama_gguf, tiny_tokens):
    cfg = load_gguf(tiny_llama_gguf, "float32").config
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (2, 64, 128)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.max_context) == (4, 2, 16, 512)
    assert cfg.vocab_size == len(tiny_tokens)


def test_smollm2_config(smollm2_compact):
    cfg = smollm2_compact.config  # numbers from the model card: 30 layers, width 576, 9 heads, 3 kv heads
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert (cfg.vocab_size, cfg.max_context, cfg.rope_theta) == (49152, 8192, 100000.0)


def test_compact_weights_are_smaller(tiny_llama_gguf):
    compact, dense = load_gguf(tiny_llama_gguf, "compact"), load_gguf(tiny_llama_gguf, "float32")
    assert compact.weight_bytes() < dense.weight_bytes() / 2


def test_tied_output_head_is_the_embedding_table(tiny_llama_gguf):
    model = load_gguf(tiny_llama_gguf, "compact").model
    assert model.lm_head is model.table


def test_unsupported_architecture_lists_the_supported_ones(make_tiny_llama):
    path = make_tiny_llama(arch="gemma3")
    with pytest.raises(UnsupportedModel) as e:
        load_gguf(path)
    message = str(e.value)
    assert str(path) in message and "'gemma3'" in message
    assert all(arch in message for arch in ARCHITECTURES) and "llama" in message


def test_missing_metadata_is_a_corrupt_model(make_tiny_llama):
    path = make_tiny_llama(block_count=False)
    with pytest.raises(CorruptModel, match="metadata incomplete") as e:
        load_gguf(path)
    assert str(path) in str(e.value)


def test_unknown_weight_mode(tiny_llama_gguf):
    with pytest.raises(ValueError, match="'int3'"):
        load_gguf(tiny_llama_gguf, "int3")


def test_without_kernels_compact_mode_falls_back_to_float32(tiny_llama_gguf):
    # the kernel module is cached per process, so this runs in a fresh interpreter
    script = (
        "import sys, torch\n"
        "from deskpod.engine.loader import load_gguf\n"
        "from deskpod.engine.models.llama import KVCache\n"
        "logits = {}\n"
        "for mode in ('compact', 'float32'):\n"
        "    lm = load_gguf(sys.argv[1], mode)\n"
        "    assert all(type(m).__name__ not in ('U4Linear', 'I8Linear') for m in lm.model.modules())\n"
        "    logits[mode] = lm.model(torch.arange(20), torch.arange(20), KVCache(lm.config, 20), all_logits=True)\n"
        "print(torch.equal(logits['compact'], logits['float32']))\n"
    )
    env = {**os.environ, "DESKPOD_NO_KERNELS": "1"}
    command = [sys.executable, "-c", script, str(tiny_llama_gguf)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
