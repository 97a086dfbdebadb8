"""Admission control: the engine plans with the planner's functions before loading, and refuses what
cannot fit with the breakdown and the ways out."""

import os
import subprocess
import sys

import pytest
from support.loading import load

from deskpod.engine.config import EngineConfig
from deskpod.engine.engine import kv_pool_blocks
from deskpod.engine.loader import admit, kv_dtype_bytes, model_shape, planned_weight_bytes
from deskpod.errors import DeskpodError
from deskpod.formats.weights import open_weights
from deskpod.plan.capacity import DoesNotFit, kv_bytes_per_token


def test_planned_weight_bytes_match_what_loading_takes(smollm2_gguf, smollm2_compact, smollm2_float32):
    source = open_weights(smollm2_gguf)
    for lm in (smollm2_compact, smollm2_float32):
        config = EngineConfig(weights="compact" if lm is smollm2_compact else "float32")
        assert planned_weight_bytes(source, config) == pytest.approx(lm.weight_bytes(), rel=0.01)


@pytest.mark.parametrize("kv_cache_dtype, element_bytes", [("auto", 2), ("float32", 4), ("float16", 2), ("bfloat16", 2)])
def test_kv_cache_takes_what_the_planner_counts(smollm2_gguf, smollm2_compact, kv_cache_dtype, element_bytes):
    """The pool the engine allocates is what the planner counts, in each KV-cache type (auto: float16 here)."""
    from deskpod.engine.runner import kv_cache_for

    config = EngineConfig(kv_cache_dtype=kv_cache_dtype)
    plan = admit(open_weights(smollm2_gguf), config, 1024)
    cache = kv_cache_for(smollm2_compact, 1024 // config.block_size, config)
    assert cache.k.nbytes + cache.v.nbytes == plan.kv_cache == 1024 * plan.kv_per_token
    spec = smollm2_compact.spec
    assert plan.kv_per_token == 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * element_bytes


def test_too_little_memory_is_refused_with_the_ways_out(smollm2_gguf, monkeypatch):
    monkeypatch.setenv("DESKPOD_MEMORY_LIMIT", "300MB")
    with pytest.raises(DoesNotFit) as refused:
        from deskpod.engine.loader import load_model

        load_model(smollm2_gguf, EngineConfig(), name="smollm2")
    message = str(refused.value)
    assert message.startswith("smollm2 needs")
    assert "kv cache" in message and "a shorter context: at most" in message and "linking boxes" in message
    # the way out it names works
    most = int(message.split("at most ")[1].split(" tokens")[0].replace(",", ""))
    assert load(smollm2_gguf, context=most).spec.num_layers == 30


def test_cli_refuses_without_a_traceback(smollm2_gguf):
    done = subprocess.run([sys.executable, "-m", "deskpod.cli", "run", str(smollm2_gguf), "hi"],
                          capture_output=True, text=True, env={**os.environ, "DESKPOD_MEMORY_LIMIT": "200MB"})
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and "needs" in done.stderr and "Traceback" not in done.stderr


def test_serving_pool_is_sized_by_the_planner(smollm2_compact):
    config = EngineConfig(kv_cache_gb=1.0, max_num_seqs=64)
    per_block = 16 * kv_bytes_per_token(model_shape(smollm2_compact.spec, "smollm2"), kv_dtype_bytes(config))
    assert kv_pool_blocks(smollm2_compact, config) == int(1e9) // per_block
    # never more than every slot's full context
    assert kv_pool_blocks(smollm2_compact, EngineConfig(kv_cache_gb=100, max_num_seqs=2)) == 2 * 8192 // 16
    with pytest.raises(DeskpodError, match="fewer than one 8,192-token context"):
        kv_pool_blocks(smollm2_compact, EngineConfig(kv_cache_gb=0.01))


def test_sliding_window_layers_are_planned_as_the_pool_holds_them(tmp_path):
    """Gemma 3's local layers keep every token's keys and values in the paged pool, as the global ones do:
    the planner counts them in full too, so its KV figure is what the engine allocates."""
    from support.architectures import CASES, build_hf

    from deskpod.engine.runner import ModelRunner

    lm = load(build_hf(CASES["gemma3"], tmp_path / "gemma3"))
    shape = model_shape(lm.spec, "tiny-gemma3")
    assert shape.sliding_layers == 5 and shape.sliding_window == 12
    runner = ModelRunner(lm, num_blocks=4, config=EngineConfig(block_size=16))
    pool = runner.cache.k.nbytes + runner.cache.v.nbytes
    assert pool == 4 * 16 * kv_bytes_per_token(shape, kv_dtype_bytes(EngineConfig()))
