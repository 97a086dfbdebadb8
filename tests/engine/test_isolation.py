"""One request's failure is its own: a sampler that raises, or a forward pass that breaks on one request's
tokens, ends that request with an error while the others in the same steps finish as if it had not been
there; and the inputs that used to break a step are checked or bounded up front."""

from __future__ import annotations

import asyncio

import pytest
from support.loading import load

from deskpod.engine import sampler as sampler_module
from deskpod.engine.async_engine import AsyncLLM
from deskpod.engine.config import EngineConfig
from deskpod.engine.engine import LLMEngine
from deskpod.engine.sampler import InvalidSamplingParams, SamplingParams
from deskpod.errors import GenerationFailed, InvalidRequest

PROMPTS = {"a": [200, 10, 20, 30, 40], "b": [200, 50, 60, 70], "c": [200, 11, 12, 13, 14, 15, 16]}
POISON = 99


@pytest.fixture(scope="module")
def tiny(tiny_llama_gguf):
    return load(tiny_llama_gguf)


def run(lm, prompts: dict[str, list[int]], params: dict[str, SamplingParams]) -> dict[str, tuple]:
    engine = LLMEngine(lm, EngineConfig(max_num_seqs=4, kv_cache_gb=0.01, context=64))
    for request_id, ids in prompts.items():
        engine.add_request(ids, params[request_id], request_id)
    done: dict[str, list] = {r: [[], None, None] for r in prompts}
    while engine.has_work():
        for out in engine.step():
            done[out.request_id][0] += out.token_ids
            done[out.request_id][1:] = [out.finish_reason, out.error]
    return {r: tuple(v) for r, v in done.items()}


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, **kw)


def test_a_sampler_that_raises_fails_only_its_request(tiny, monkeypatch):
    alone = run(tiny, {k: v for k, v in PROMPTS.items() if k != "b"}, {"a": greedy(), "c": greedy()})
    real = sampler_module.Sampler.__call__

    def call(self, logits):
        if self.params.seed == 666:
            raise RuntimeError("this request's sampling broke")
        return real(self, logits)

    monkeypatch.setattr(sampler_module.Sampler, "__call__", call)
    together = run(tiny, PROMPTS, {"a": greedy(), "b": greedy(seed=666), "c": greedy()})
    assert together["b"][1:] == ("error", "RuntimeError: this request's sampling broke")
    assert together["a"] == alone["a"] and together["c"] == alone["c"]
    assert together["a"][1] == "length" and len(together["a"][0]) == 6


def test_a_forward_pass_broken_by_one_request_is_retried_without_it(tiny):
    alone = run(tiny, {k: v for k, v in PROMPTS.items() if k != "b"}, {"a": greedy(), "c": greedy()})
    forward = tiny.model.forward_batch

    def breaks_on_poison(ids, batch, cache):
        if POISON in ids.tolist():
            raise IndexError("a kernel choked on this token")
        return forward(ids, batch, cache)

    tiny.model.forward_batch = breaks_on_poison
    try:
        together = run(tiny, {**PROMPTS, "b": [200, POISON, 1]}, {"a": greedy(), "b": greedy(), "c": greedy()})
    finally:
        del tiny.model.forward_batch
    assert together["b"][1] == "error" and "a kernel choked on this token" in together["b"][2]
    assert together["a"] == alone["a"] and together["c"] == alone["c"]


def test_the_server_engine_fails_only_that_stream(tiny, monkeypatch):
    real = sampler_module.Sampler.__call__
    monkeypatch.setattr(sampler_module.Sampler, "__call__",
                        lambda self, logits: (_ for _ in ()).throw(ValueError("bad")) if self.params.seed == 7 else real(self, logits))
    engine = AsyncLLM(LLMEngine(tiny, EngineConfig(kv_cache_gb=0.01, context=64)), "tiny")

    async def collect(ids, params):
        return [o async for o in engine.generate(ids, params)]

    async def main():
        return await asyncio.gather(collect(PROMPTS["a"], greedy()), collect(PROMPTS["b"], greedy(seed=7)),
                                    collect(PROMPTS["c"], greedy()), return_exceptions=True)

    try:
        a, b, c = asyncio.run(main())
    finally:
        asyncio.run(engine.shutdown())
    assert isinstance(b, GenerationFailed) and "ValueError: bad" in str(b)
    assert a[-1].finish_reason == c[-1].finish_reason == "length"


def test_sampling_bounds():
    with pytest.raises(InvalidSamplingParams, match="seed must be a 64-bit integer"):
        SamplingParams(seed=2**64)
    with pytest.raises(InvalidSamplingParams, match="temperature"):
        SamplingParams(temperature=float("nan"))
    assert SamplingParams(temperature=1e-45).greedy and SamplingParams(seed=2**64 - 1).seed == 2**64 - 1


def test_a_tiny_temperature_samples_as_greedy(tiny):
    out = run(tiny, {"a": PROMPTS["a"]}, {"a": SamplingParams(temperature=1e-45, max_tokens=6, ignore_eos=True)})
    assert out == run(tiny, {"a": PROMPTS["a"]}, {"a": greedy()})


def test_a_lone_surrogate_is_refused_as_a_bad_request(tiny):
    with pytest.raises(InvalidRequest, match="lone surrogate .U\\+D800"):
        tiny.tokenizer.encode("hello \ud800 world")
