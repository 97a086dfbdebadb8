"""Mixture-of-Experts beyond the logits (tests/engine/test_architectures.py compares those with transformers):
a decode step reads only the experts its tokens chose, a prefill runs each chosen expert once over all its
tokens, the experts of a quantized GGUF stay in their blocks, and the planner counts what the engine holds."""

from __future__ import annotations

import pytest
from support.architectures import CASES, build_hf, prompts, write_gguf
from support.loading import load

from deskpod.engine.config import EngineConfig
from deskpod.engine.engine import LLMEngine
from deskpod.engine.models.layers import MoE
from deskpod.engine.sampler import SamplingParams
from deskpod.plan.devices import get_hardware
from deskpod.plan.planner import make_plan
from deskpod.plan.source import resolve


@pytest.fixture(scope="module")
def moe_gguf(tmp_path_factory):
    folder = build_hf(CASES["qwen3-moe"], tmp_path_factory.mktemp("moe") / "qwen3-moe")
    return write_gguf(CASES["qwen3-moe"], folder, folder.parent / "qwen3-moe-q.gguf", quantized=True)


def expert_calls(model) -> list[list[int]]:
    """Per MoE layer, the number of tokens each expert computed in the last forward pass (hooks)."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    counts = [[0] * len(layer.experts) for layer in layers]
    for li, layer in enumerate(layers):
        for e, expert in enumerate(layer.experts):
            expert.register_forward_hook(lambda mod, args, out, li=li, e=e: counts[li].__setitem__(e, counts[li][e] + args[0].shape[0]))
    return counts


def test_decode_reads_only_the_chosen_experts_and_prefill_runs_each_once(moe_gguf):
    loaded = load(moe_gguf)
    engine = LLMEngine(loaded, EngineConfig(kv_cache_gb=0.01, context=128))
    counts = expert_calls(loaded.model)
    engine.add_request(prompts(1, 30)[0], SamplingParams(temperature=0, max_tokens=3))
    engine.step()  # the prefill: 30 tokens
    top_k = loaded.spec.experts_per_token
    for layer in counts:
        assert sum(layer) == 30 * top_k  # every token went to top_k experts ...
        assert max(layer) <= 30  # ... each expert computing its tokens in one call, none twice
    for layer in counts:
        layer[:] = [0] * len(layer)
    engine.step()  # one decode token
    for layer in counts:
        assert sum(layer) == top_k and sum(1 for c in layer if c) == top_k  # 2 of 8 experts read


def test_quantized_experts_stay_in_their_blocks(moe_gguf):
    loaded = load(moe_gguf)
    spec = loaded.spec
    moe = next(m for m in loaded.model.modules() if isinstance(m, MoE))
    for expert in moe.experts:
        held = sum(t.numel() * t.element_size() for t in [*expert.buffers(), *expert.parameters()])
        as_float32 = 3 * spec.intermediate_size * spec.hidden_size * 4
        assert held < 0.4 * as_float32  # Q8_0 / Q5_1 / Q4_0 blocks: about 1, 0.75 and 0.56 bytes a weight


def test_the_planner_counts_the_experts_the_engine_holds(moe_gguf):
    loaded = load(moe_gguf)
    plan = make_plan(resolve(str(moe_gguf)), get_hardware("digits"))
    shape = plan.source.shape
    assert shape.active_params < shape.total_params  # 2 of 8 experts per token
    held = loaded.weight_bytes()
    assert abs(plan.weights.total - held) / held < 0.10, (plan.weights.total, held)
