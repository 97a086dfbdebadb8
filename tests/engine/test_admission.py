"""Admission control: the engine plans with the planner's functions before loading, and refuses what
cannot fit with the breakdown and the ways out."""

import os
import subprocess
import sys

import pytest

from deskpod.engine.loader import KV_DTYPE_BYTES, admit, llama_config, load_gguf, planned_weight_bytes
from deskpod.engine.models.llama import KVCache
from deskpod.formats.gguf import GGUFFile
from deskpod.plan.capacity import DoesNotFit


def test_planned_weight_bytes_match_what_loading_takes(smollm2_gguf, smollm2_compact, smollm2_float32):
    gguf = GGUFFile(smollm2_gguf)
    for mode, lm in (("compact", smollm2_compact), ("float32", smollm2_float32)):
        rotary_table = lm.model.rotary.rotations.numel() * lm.model.rotary.rotations.element_size()
        assert planned_weight_bytes(gguf, mode) == pytest.approx(lm.weight_bytes() - rotary_table, rel=0.01)


def test_kv_cache_takes_what_the_planner_counts(smollm2_gguf):
    gguf = GGUFFile(smollm2_gguf)
    cfg = llama_config(gguf)
    plan = admit(gguf, cfg, "compact", 1000)
    cache = KVCache(cfg, 1000)
    assert cache.k.nbytes + cache.v.nbytes == plan.kv_cache == 1000 * plan.kv_per_token
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
