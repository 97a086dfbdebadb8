"""load_model on GGUF files: the spec from metadata, weights compact or float32, and clear refusals that name
the model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support.loading import load

from deskpod.engine.models import REGISTRY
from deskpod.errors import CorruptModel, DeskpodError, UnsupportedModel


def test_spec_comes_from_metadata(tiny_llama_gguf, tiny_tokens):
    spec = load(tiny_llama_gguf, "float32").spec
    assert (spec.num_layers, spec.hidden_size, spec.intermediate_size) == (2, 64, 128)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.max_context) == (4, 2, 16, 512)
    assert spec.vocab_size == len(tiny_tokens)


def test_smollm2_spec(smollm2_compact):
    spec = smollm2_compact.spec  # numbers from the model card: 30 layers, width 576, 9 heads, 3 kv heads
    assert (spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (30, 576, 9, 3, 64)
    assert (spec.vocab_size, spec.max_context, spec.rope.theta, spec.tied_embeddings) == (49152, 8192, 100000.0, True)


def test_compact_weights_are_smaller(tiny_llama_gguf):
    compact, dense = load(tiny_llama_gguf, "compact"), load(tiny_llama_gguf, "float32")
    assert compact.weight_bytes() < dense.weight_bytes() / 2


def test_tied_output_head_is_the_embedding_table(tiny_llama_gguf):
    model = load(tiny_llama_gguf, "compact").model
    assert model.head is model.table


def test_unsupported_architecture_lists_the_supported_ones(make_tiny_llama):
    path = make_tiny_llama(arch="falcon")
    with pytest.raises(UnsupportedModel) as e:
        load(path)
    message = str(e.value)
    assert str(path) in message and "'falcon'" in message
    assert all(arch in message for arch in REGISTRY)


def test_missing_metadata_is_a_corrupt_model_naming_the_key(make_tiny_llama):
    path = make_tiny_llama(block_count=False)
    with pytest.raises(CorruptModel, match="missing llama.block_count") as e:
        load(path)
    assert str(path) in str(e.value)


def test_errors_name_the_model_as_the_user_did(make_tiny_llama):
    from deskpod.engine.config import EngineConfig
    from deskpod.engine.loader import load_model

    with pytest.raises(CorruptModel) as e:
        load_model(make_tiny_llama(block_count=False), EngineConfig(), name="my-model:v2")
    assert str(e.value).startswith("my-model:v2: ")


def test_unknown_weight_mode(tiny_llama_gguf):
    with pytest.raises(DeskpodError, match="'int3'"):
        load(tiny_llama_gguf, "int3")


def test_without_kernels_compact_mode_falls_back_to_float32(tiny_llama_gguf):
    # the kernel module is cached per process, so this runs in a fresh interpreter
    script = (
        "import sys, torch\n"
        "from support.loading import load, logits_of\n"
        "logits = {}\n"
        "for mode in ('compact', 'float32'):\n"
        "    lm = load(sys.argv[1], mode)\n"
        "    assert all(type(m).__name__ not in ('U4Weight', 'I8Weight') for m in lm.model.modules())\n"
        "    logits[mode] = logits_of(lm, list(range(20)))\n"
        "print(torch.equal(logits['compact'], logits['float32']))\n"
    )
    env = {**os.environ, "DESKPOD_NO_KERNELS": "1", "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    command = [sys.executable, "-c", script, str(tiny_llama_gguf)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
