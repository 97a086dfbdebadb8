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


def expert_calls(model) -> tuple[list[list[int]], list[list[int]]]:
    """Per MoE layer and expert: the tokens computed, and the calls made (hooks; reset by the caller)."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    tokens = [[0] * len(layer.experts) for layer in layers]
    calls = [[0] * len(layer.experts) for layer in layers]

    def hook(li: int, e: int):
        def record(module, args, out):
            tokens[li][e] += args[0].shape[0]
            calls[li][e] += 1
        return record

    for li, layer in enumerate(layers):
        for e, expert in enumerate(layer.experts):
            expert.register_forward_hook(hook(li, e))
    return tokens, calls


def test_decode_reads_only_the_chosen_experts_and_prefill_runs_each_once(moe_gguf, monkeypatch):
    import deskpod.quant.ggml as ggml

    loaded = load(moe_gguf)
    engine = LLMEngine(loaded, EngineConfig(kv_cache_gb=0.01, context=128))
    tokens, _ = expert_calls(loaded.model)
    # the experts run two kernel calls a layer (MoE.block_experts): which experts' weights they were given, and
    # for how many rows
    owner = {id(w): (li, e) for li, layer in enumerate(m for m in loaded.model.modules() if isinstance(m, MoE))
             for e, expert in enumerate(layer.experts) for w in expert.buffers()}
    given: dict[tuple[int, int], int] = {}
    real = ggml.multi_matmul

    def recording(x, work, out_rows, width):
        for placed in work:
            given[owner[id(placed.weight.blocks)]] = placed.count
        return real(x, work, out_rows, width)

    monkeypatch.setattr(ggml, "multi_matmul", recording)
    engine.add_request(prompts(1, 30)[0], SamplingParams(temperature=0, max_tokens=3))
    engine.step()  # the prefill: 30 tokens
    top_k = loaded.spec.experts_per_token
    assert all(sum(layer) == 0 for layer in tokens)  # not expert by expert, but in the kernel calls:
    for li in range(len(tokens)):  # every token went to top_k experts, each chosen expert over all its tokens
        assert sum(n for (layer, _), n in given.items() if layer == li) == 30 * top_k
    given.clear()
    engine.step()  # one decode token
    for li in range(len(tokens)):  # 2 of 8 experts' weights read, per layer
        assert sorted(n for (layer, _), n in given.items() if layer == li) == [1] * top_k


@pytest.mark.parametrize("tokens", [1, 30])
def test_experts_in_two_kernel_calls_equal_expert_by_expert(moe_gguf, tokens):
    import torch

    loaded = load(moe_gguf)
    layers = [m for m in loaded.model.modules() if isinstance(m, MoE)]
    x = torch.randn(tokens, loaded.spec.hidden_size, generator=torch.Generator().manual_seed(0))
    for layer in layers:
        assert layer.block_experts() is not None
        fused = layer(x)
        layer._block_experts = False  # the expert-by-expert path
        assert torch.equal(fused, layer(x))


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


def test_a_token_alone_and_in_a_batch_gets_the_same_experts_and_output():
    """Eight experts a token out of sixteen: the grouped path (a batch) and the one-token path (decode) route
    and weigh alike (up to the matmuls' own rounding, which depends on how many rows they see)."""
    import torch

    from deskpod.engine.models.layers import MLP
    from deskpod.quant.linear import DenseWeight, Linear

    torch.manual_seed(0)
    hidden, width, count = 16, 8, 16

    def linear(rows, cols):
        return Linear(DenseWeight(torch.randn(rows, cols)))

    experts = [MLP(linear(2 * width, hidden), linear(hidden, width), width, "silu") for _ in range(count)]
    moe = MoE(linear(count, hidden), experts, top_k=8, norm_topk=True)
    x = torch.randn(5, hidden)
    batched = moe(x)
    alone = torch.cat([moe(x[i : i + 1]) for i in range(5)])
    assert torch.allclose(batched, alone, rtol=1e-5, atol=1e-4)
    assert torch.equal(moe.route(x)[1].sort(-1).values,
                       torch.cat([moe.route(x[i : i + 1])[1] for i in range(5)]).sort(-1).values)


def kept_in_mxfp4(weight) -> bool:
    """On the CPU's GGUF kernels (ggml's MXFP4 blocks) where they are built, else in the mxfp4 scheme."""
    from deskpod.quant.ggml import BlockWeight
    from deskpod.quant.linear import SchemeWeight

    return (isinstance(weight, BlockWeight) and weight.ggml_type == "MXFP4") or (
        isinstance(weight, SchemeWeight) and weight.scheme == "mxfp4")


def test_gpt_oss_with_its_experts_in_mxfp4_as_openai_publishes_them(tmp_path):
    """`*_blocks` / `*_scales` read as they are (never re-quantized): logits equal transformers' float32 with the
    same MXFP4 values within 1e-4, and the experts stay resident at 4.25 bits a weight."""
    from support.architectures import hf_logits, write_hf_mxfp4
    from support.loading import logits_of

    import torch

    folder = build_hf(CASES["gpt-oss"], tmp_path / "float")
    write_hf_mxfp4(folder, tmp_path / "mxfp4", tmp_path / "reference")
    ids = prompts(1, 40)[0]
    [want] = hf_logits(tmp_path / "reference", [ids])
    got = logits_of(load(tmp_path / "mxfp4", "float32"), ids)
    assert want.abs().max() > 1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    loaded = load(tmp_path / "mxfp4")
    experts = [expert for m in loaded.model.modules() if isinstance(m, MoE) for expert in m.experts]
    weights = [linear.weight for expert in experts for linear in (expert.w_gate_up, expert.w_down)]
    assert all(kept_in_mxfp4(w) for w in weights), weights[:2]
    held = sum(t.numel() * t.element_size() for w in weights for t in w.buffers())
    assert held * 8 / sum(w.in_features * w.out_features for w in weights) == 4.25  # E2M1 codes, an E8M0 per 32


def test_gpt_oss_gguf_as_llama_cpp_writes_it(tmp_path):
    """llama.cpp's `gpt-oss` GGUF: its conventions (every other layer local, the sinks, OpenAI's SwiGLU, the
    pre-MLP norm it calls post_attention_norm) and MXFP4 experts kept in their codes. llama.cpp's YaRN rounds
    the correction range (transformers' truncate = true), so the reference model does too."""
    from dataclasses import replace as with_config

    from support.architectures import hf_logits, write_gpt_oss_gguf, write_hf_mxfp4
    from support.loading import logits_of

    import torch

    case = CASES["gpt-oss"]
    rope = {**case.config["rope_parameters"], "truncate": True}
    folder = build_hf(with_config(case, config={**case.config, "rope_parameters": rope}), tmp_path / "float")
    write_hf_mxfp4(folder, tmp_path / "mxfp4", tmp_path / "reference")
    path = write_gpt_oss_gguf(tmp_path / "reference", tmp_path / "gpt-oss.gguf")
    ids = prompts(1, 40)[0]
    [want] = hf_logits(tmp_path / "reference", [ids])
    loaded = load(path, "float32")
    assert loaded.spec.architecture == "gpt-oss" and loaded.spec.attention_sinks and loaded.spec.swiglu
    got = logits_of(loaded, ids)
    assert want.abs().max() > 1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    experts = [expert for m in load(path).model.modules() if isinstance(m, MoE) for expert in m.experts]
    assert all(kept_in_mxfp4(linear.weight) for expert in experts for linear in (expert.w_gate_up, expert.w_down))
