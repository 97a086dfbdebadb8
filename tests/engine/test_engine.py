"""The serving engine on the real SmolLM2: continuous batching, paged KV cache, preemption, prefix caching,
cancellation, and the async front end.

Whether batching, chunking or preemption change a request's tokens is checked on the float32 model, whose
results do not depend on what else is in a step beyond float rounding. The compact kernels round activations
to int8 as llama.cpp does, which turns such rounding differences into occasional different choices at
near-ties; for them the check is vLLM's: identical until a divergence, and there each side's token is among
the other's most likely."""

import asyncio
from dataclasses import replace

import pytest
import torch

from support.compare import assert_greedy_close

from deskpod.engine.async_engine import AsyncLLM
from deskpod.engine.attention import decode_attention, decode_attention_reference
from deskpod.engine.engine import EngineConfig, LLMEngine
from deskpod.engine.generate import Completion, generate
from deskpod.engine.sampler import SamplingParams
from deskpod.engine.scheduler import QueueFull

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Why is the sky blue?", "Count to five.", "Say hello."]


def run_all(engine: LLMEngine, prompts: dict[str, list[int]], params=GREEDY, cancel: dict[int, str] | None = None) -> dict[str, list[int]]:
    outputs = {rid: [] for rid in prompts}
    for rid, ids in prompts.items():
        engine.add_request(ids, params, rid)
    step = 0
    while engine.has_work():
        for out in engine.step():
            outputs[out.request_id] += out.token_ids
        step += 1
        if cancel and step in cancel:
            engine.abort(cancel[step])
    return outputs


@pytest.fixture(scope="module")
def prompts(smollm2_compact):
    engine = LLMEngine(smollm2_compact, EngineConfig(kv_cache_gb=0.2, context=1024))
    return {f"r{i}": engine.chat_prompt([{"role": "user", "content": q}]) for i, q in enumerate(QUESTIONS)}


@pytest.fixture(scope="module")
def alone(smollm2_float32, prompts):
    """Each prompt's greedy tokens when it runs by itself."""
    return {rid: generate(smollm2_float32, ids, GREEDY).token_ids for rid, ids in prompts.items()}


def test_batched_greedy_equals_single_request(smollm2_float32, prompts, alone):
    engine = LLMEngine(smollm2_float32, EngineConfig(kv_cache_gb=0.2, context=1024))
    assert run_all(engine, prompts) == alone
    assert engine.stats().kv_usage == 0


def test_compact_batched_greedy_stays_with_single_requests(smollm2_compact, prompts):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5)
    single = {rid: generate(smollm2_compact, ids, params) for rid, ids in prompts.items()}
    engine = LLMEngine(smollm2_compact, EngineConfig(kv_cache_gb=0.2, context=1024, max_num_batched_tokens=20))
    batched = {rid: Completion(ids) for rid, ids in prompts.items()}
    for rid, ids in prompts.items():
        engine.add_request(ids, params, rid)
    while engine.has_work():
        for out in engine.step():
            batched[out.request_id].add(out)
    for rid in prompts:
        assert_greedy_close(single[rid], batched[rid])


def test_chunked_prefill_and_late_arrivals_change_nothing(smollm2_float32, prompts, alone):
    # a 20-token chunk budget cuts every prompt; requests arrive while others decode
    engine = LLMEngine(smollm2_float32, EngineConfig(kv_cache_gb=0.2, context=1024, max_num_batched_tokens=20, max_num_seqs=5))
    outputs = {rid: [] for rid in prompts}
    pending = list(prompts.items())
    while pending or engine.has_work():
        if pending:
            rid, ids = pending.pop(0)
            engine.add_request(ids, GREEDY, rid)
        for out in engine.step():
            outputs[out.request_id] += out.token_ids
    assert outputs == alone


def test_preemption_leaves_outputs_unchanged(smollm2_float32):
    # raw prompts (no shared template prefix to cache) and a pool of little more than one request:
    # requests must be preempted and recomputed
    tok = smollm2_float32.tokenizer
    prompts = {f"p{i}": tok.encode(f"{i} + {i} = {2 * i}. Here is a short story about a {q}") for i, q in enumerate(QUESTIONS)}
    alone = {rid: generate(smollm2_float32, ids, GREEDY).token_ids for rid, ids in prompts.items()}
    longest = max(len(ids) for ids in prompts.values()) + GREEDY.max_tokens
    blocks = -(-longest // 16) + 1
    engine = LLMEngine(smollm2_float32, EngineConfig(context=longest + 16, block_size=16), num_blocks=blocks)
    assert run_all(engine, prompts) == alone
    assert engine.stats().num_preemptions > 0
    assert engine.stats().kv_blocks_free == blocks


def test_shared_system_prompt_is_computed_once(smollm2_compact):
    engine = LLMEngine(smollm2_compact, EngineConfig(kv_cache_gb=0.2, context=1024))
    system = [{"role": "system", "content": "You are a terse assistant. " * 8}]
    a = engine.chat_prompt(system + [{"role": "user", "content": "Hi"}])
    b = engine.chat_prompt(system + [{"role": "user", "content": "Bye"}])
    run_all(engine, {"a": a})
    engine.add_request(b, GREEDY, "b")
    out = engine.scheduler.schedule()
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert out.scheduled[0].start == shared // 16 * 16 > 0  # only the tokens past the cached blocks
    engine.runner.execute(out)


def test_cancel_frees_blocks_at_once(smollm2_compact, prompts):
    engine = LLMEngine(smollm2_compact, EngineConfig(kv_cache_gb=0.2, context=1024))
    free = engine.stats().kv_blocks_free
    outputs = run_all(engine, prompts, cancel={3: "r1", 5: "r4"})
    assert len(outputs["r1"]) < GREEDY.max_tokens and len(outputs["r0"]) == GREEDY.max_tokens
    assert engine.stats().kv_blocks_free == free and engine.stats().kv_usage == 0


def test_seeded_sampling_is_reproducible_in_a_batch(smollm2_compact, prompts):
    """A seed gives the same tokens run after run. Alone or among others, the same tokens here with a float32
    cache: a prompt's rows meet the weights in the integer kernels when few and in a float GEMM among many (the
    same products, rounded apart in the last bits), which a float16 cache may round to neighbouring values."""
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=10, ignore_eos=True)
    config = EngineConfig(kv_cache_gb=0.2, context=1024)
    assert config.kv_dtype == "float16"
    batched = run_all(LLMEngine(smollm2_compact, config), prompts, params)
    assert run_all(LLMEngine(smollm2_compact, config), prompts, params) == batched
    float32_cache = replace(config, kv_cache_dtype="float32")
    first = run_all(LLMEngine(smollm2_compact, float32_cache), prompts, params)
    second = run_all(LLMEngine(smollm2_compact, float32_cache), {"r2": prompts["r2"]}, params)
    assert first["r2"] == second["r2"]


def test_logprobs(smollm2_compact, prompts):
    engine = LLMEngine(smollm2_compact, EngineConfig(kv_cache_gb=0.2, context=1024))
    engine.add_request(prompts["r0"], SamplingParams(temperature=0, max_tokens=3, logprobs=2), "x")
    outs = [o for _ in range(4) for o in engine.step()]
    lp = outs[0].logprobs[0]
    assert lp.token_id == outs[0].token_ids[0] == lp.top[0][0]  # greedy picks the most likely
    assert lp.logprob <= 0 and len(lp.top) == 2 and lp.top[0][2] >= lp.top[1][2]


def test_queue_full(smollm2_compact, prompts):
    engine = LLMEngine(smollm2_compact, EngineConfig(kv_cache_gb=0.2, context=1024, max_waiting=2))
    engine.add_request(prompts["r0"], GREEDY)
    engine.add_request(prompts["r1"], GREEDY)
    with pytest.raises(QueueFull):
        engine.add_request(prompts["r2"], GREEDY)


def test_decode_kernel_matches_reference():
    torch.manual_seed(0)
    k, v = torch.randn(10, 16, 3, 64), torch.randn(10, 16, 3, 64)
    q = torch.randn(4, 9, 64)
    tables = torch.tensor([[3, 1, 0], [2, 0, 0], [9, 8, 7], [5, 0, 0]])
    lens = torch.tensor([20, 1, 48, 16])
    torch.testing.assert_close(decode_attention(q, k, v, tables, lens, 0.125),
                               decode_attention_reference(q, k, v, tables, lens, 0.125), rtol=1e-5, atol=1e-5)
    sinks = torch.randn(9) * 3  # gpt-oss: each head's sink in the denominator, with a window too
    with_sinks = decode_attention(q, k, v, tables, lens, 0.125, 8, 0.0, sinks)
    torch.testing.assert_close(with_sinks, decode_attention_reference(q, k, v, tables, lens, 0.125, 8, 0.0, sinks),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_sinks, decode_attention(q, k, v, tables, lens, 0.125, 8, 0.0))  # they count


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (8, 1, 128), (4, 4, 256), (16, 2, 80), (64, 8, 64)])
def test_decode_kernel_matches_reference_for_every_shape(heads, kv_heads, head_dim, cache_dtype):
    """Group sizes 1 to 8, head sizes the vectorised path takes (multiples of 16) and one it leaves to the
    plain loop (80); contexts of 1 key, fewer than 8, not a multiple of 8, and of several 128-key pieces
    (combined after); windows within a piece and across pieces, a softcap, sinks; keys and values cached in
    float32, float16 and bfloat16 (read as float32: the reference reads the same rounded values)."""
    torch.manual_seed(heads + head_dim)
    k, v = (torch.randn(110, 16, kv_heads, head_dim).to(cache_dtype) for _ in range(2))
    q = torch.randn(5, heads, head_dim) * 2
    tables = torch.randperm(110)[:100].view(5, 20)
    lens = torch.tensor([1, 7, 129, 300, 61])
    for window, softcap, sinks in ((0, 0.0, None), (13, 0.0, None), (200, 0.0, None), (0, 30.0, None),
                                   (150, 0.0, torch.randn(heads) * 3)):
        got = decode_attention(q, k, v, tables, lens, head_dim**-0.5, window, softcap, sinks)
        want = decode_attention_reference(q, k, v, tables, lens, head_dim**-0.5, window, softcap, sinks)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("strided", [True, False])
def test_rope_and_store_kernel_is_the_plain_path_bit_for_bit(strided, cache_dtype):
    """RoPE and the cache writes in one pass: the same bits as Rotary.apply and store_kv, from a slice of the fused
    projection (strided rows) or from a contiguous copy (models that norm q and k first); a YaRN magnitude; into a
    float32, float16 or bfloat16 cache (rounded as torch rounds)."""
    from deskpod.engine.attention import store_kv
    from deskpod.engine.models.layers import Rotary
    from deskpod.formats.spec import RopeSpec
    from deskpod.quant.kernels import cpu_ops

    torch.manual_seed(1)
    T, H, KV, D = 7, 9, 3, 64
    qkv = torch.randn(T, H + 2 * KV, D)
    qk = qkv[:, : H + KV] if strided else qkv[:, : H + KV].contiguous()
    rope = RopeSpec(kind="yarn", theta=10000.0, factor=4.0, original_context=512)
    rot = Rotary(rope, D, 2048).select(torch.tensor([0, 5, 100, 101, 102, 900, 2000]))
    slots = torch.tensor([3, 17, 40, 41, 42, 100, 159])
    k_cache, v_cache = torch.zeros(10, 16, KV, D, dtype=cache_dtype), torch.zeros(10, 16, KV, D, dtype=cache_dtype)
    k_fused, v_fused = k_cache.clone(), v_cache.clone()
    rotated = Rotary.apply(qk, rot)
    store_kv(k_cache, v_cache, slots, rotated[:, H:], qkv[:, H + KV :])
    q = cpu_ops().rope_store(qk, qkv[:, H + KV :], torch.view_as_real(rot), k_fused, v_fused, slots, H)
    assert torch.equal(q, rotated[:, :H]) and torch.equal(k_fused, k_cache) and torch.equal(v_fused, v_cache)
    with pytest.raises(RuntimeError, match="slot 160 is outside the cache"):
        cpu_ops().rope_store(qk, qkv[:, H + KV :], torch.view_as_real(rot), k_fused, v_fused, slots + 1, H)


def test_async_engine_streams_and_aborts(smollm2_float32, prompts, alone):
    async def main():
        llm = AsyncLLM(LLMEngine(smollm2_float32, EngineConfig(kv_cache_gb=0.2, context=1024)), "smollm2")

        async def collect(rid):
            return [t async for out in llm.generate(prompts[rid], GREEDY) for t in out.token_ids]

        results = await asyncio.gather(*(collect(rid) for rid in prompts))
        stream = llm.generate(prompts["r0"], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        await stream.__anext__()
        await stream.aclose()  # the client went away: the abort reaches the engine thread between steps
        for _ in range(100):
            if (stats := llm.stats()).kv_usage == 0:
                break
            await asyncio.sleep(0.05)
        await llm.shutdown()
        return results, stats

    results, stats = asyncio.run(main())
    assert results == list(alone.values())
    assert stats.kv_usage == 0 and stats.num_running == 0
