"""Admission control: the engine plans with the planner's functions before loading, and refuses what
cannot fit with the breakdown and the ways out."""

import os
import subprocess
import sys

import pytest

from deskpod.engine.engine import EngineConfig, kv_pool_blocks
from deskpod.engine.loader import KV_DTYPE_BYTES, admit, llama_config, load_gguf, model_shape, planned_weight_bytes
from deskpod.errors import DeskpodError
from deskpod.engine.models.llama import KVCache
from deskpod.formats.gguf import GGUFFile
from deskpod.plan.capacity import DoesNotFit, kv_bytes_per_token


def test_planned_weight_bytes_match_what_loading_takes(smollm2_gguf, smollm2_compact, smollm2_float32):
    gguf = GGUFFile(smollm2_gguf)
    for mode, lm in (("compact", smollm2_compact), ("float32", smollm2_float32)):
        rotary_table = lm.model.rotary.rotations.numel() * lm.model.rotary.rotations.element_size()
        assert planned_weight_bytes(gguf, mode) == pytest.approx(lm.weight_bytes() - rotary_table, rel=0.01)


def test_kv_cache_takes_what_the_planner_counts(smollm2_gguf):
    gguf = GGUFFile(smollm2_gguf)
    cfg = llama_config(gguf)
    plan = admit(gguf, cfg, "compact", 1024)
    cache = KVCache(cfg, 1024)
    assert cache.k.nbytes + cache.v.nbytes == plan.kv_cache == 1024 * plan.kv_per_token
    assert plan.kv_per_token == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * KV_DTYPE_BYTES


def test_too_little_memory_is_refused_with_the_ways_out(smollm2_gguf, monkeypatch):
    monkeypatch.setenv("DESKPOD_MEMORY_LIMIT", "300MB")
    with pytest.raises(DoesNotFit) as refused:
        load_gguf(smollm2_gguf, name="smollm2")
    message = str(refused.value)
    assert message.startswith("smollm2 needs")
    assert "kv cache" in message and "a shorter context: at most" in message and "linking boxes" in message
    # the way out it names works
    most = int(message.split("at most ")[1].split(" tokens")[0].replace(",", ""))
    assert load_gguf(smollm2_gguf, context=most).config.num_layers == 30


def test_cli_refuses_without_a_traceback(smollm2_gguf):
    done = subprocess.run([sys.executable, "-m", "deskpod.cli", "run", str(smollm2_gguf), "hi"],
                          capture_output=True, text=True, env={**os.environ, "DESKPOD_MEMORY_LIMIT": "200MB"})
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and "needs" in done.stderr and "Traceback" not in done.stderr


def test_serving_pool_is_sized_by_the_planner(smollm2_compact):
    per_block = 16 * kv_bytes_per_token(model_shape("smollm2", smollm2_compact.config), KV_DTYPE_BYTES)
    config = EngineConfig(kv_cache_gb=1.0, max_num_seqs=64)
    assert kv_pool_blocks(smollm2_compact, config) == int(1e9) // per_block
    # never more than every slot's full context
    assert kv_pool_blocks(smollm2_compact, EngineConfig(kv_cache_gb=100, max_num_seqs=2)) == 2 * 8192 // 16
    with pytest.raises(DeskpodError, match="fewer than one 8,192-token context"):
        kv_pool_blocks(smollm2_compact, EngineConfig(kv_cache_gb=0.01))
