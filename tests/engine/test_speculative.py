"""Speculative decoding (prompt lookup, and a draft model) on the real SmolLM2: the same replies as a token a step
— greedy, seeded sampling with penalties, logprobs, stop strings, lengths, structured outputs — in fewer steps.

The compact kernels give a row the same result whatever else is in its step, and a draft's rows are attended to
as decoding tokens, so the tokens are compared for equality, not closeness."""

import json
from pathlib import Path

import pytest

from deskpod.engine.config import EngineConfig, SpeculativeConfig
from deskpod.engine.engine import LLMEngine
from deskpod.engine.sampler import SamplingParams, StructuredOutput
from deskpod.errors import DeskpodError
from deskpod.quant.convert import convert

CODE = json.loads((Path(__file__).parents[1] / "data" / "code-samples.json").read_text())["parse_config"]
ASKS = {
    "edit": "Rename the variable `lines` to `rows` in this function and give the whole function back:\n\n" + CODE,
    "quote": "Repeat this sentence three times: the quick brown fox jumps over the lazy dog.",
    "capital": "What is the capital of France?",
}
SPEC = SpeculativeConfig(num_speculative_tokens=4)


def run(loaded, requests: dict[str, tuple[list[int], SamplingParams]], speculative=None) -> tuple[dict, LLMEngine, int]:
    """Every request's outputs, field by field, and the engine and its step count."""
    engine = LLMEngine(loaded, EngineConfig(kv_cache_gb=0.1, context=1024, speculative=speculative))
    results = {rid: {"tokens": [], "text": "", "logprobs": [], "finish": None} for rid in requests}
    for rid, (ids, params) in requests.items():
        engine.add_request(ids, params, rid)
    steps = 0
    while engine.has_work():
        steps += 1
        for out in engine.step():
            r = results[out.request_id]
            r["tokens"] += out.token_ids
            r["text"] += out.text
            r["logprobs"] += [(lp.token_id, round(lp.logprob, 4), [t[0] for t in lp.top]) for lp in out.logprobs or []]
            r["finish"] = out.finish_reason or r["finish"]
            assert out.error is None, out.error
    return results, engine, steps


@pytest.fixture(scope="module")
def chats(smollm2_compact) -> dict[str, list[int]]:
    engine = LLMEngine(smollm2_compact, EngineConfig(kv_cache_gb=0.1, context=1024))
    return {name: engine.chat_prompt([{"role": "user", "content": text}]) for name, text in ASKS.items()}


def test_greedy_replies_are_the_same_in_fewer_steps(smollm2_compact, chats):
    greedy = SamplingParams(temperature=0, max_tokens=120)
    requests = {name: (ids, greedy) for name, ids in chats.items()}
    plain, _, plain_steps = run(smollm2_compact, requests)
    fast, engine, fast_steps = run(smollm2_compact, requests, SPEC)
    assert fast == plain
    stats = engine.stats()
    assert stats.draft_tokens_total > stats.accepted_tokens_total > 40  # the edit copies most of its prompt
    assert fast_steps < 0.7 * plain_steps
    assert stats.generation_tokens_total == sum(len(r["tokens"]) + (r["finish"] == "stop") for r in plain.values())
    assert stats.kv_usage == 0


def test_every_sampling_setting_gives_the_same_reply(smollm2_compact, chats):
    """Each kept guess and the token after them are drawn by the request's own sampler, row after row, as they
    would be a step at a time: seeds, penalties, logprobs and every way of stopping come out the same."""
    edit, quote = chats["edit"], chats["quote"]
    requests = {
        "seeded": (edit, SamplingParams(temperature=0.7, top_p=0.9, seed=11, max_tokens=80, logprobs=2)),
        "penalised": (quote, SamplingParams(temperature=0, repetition_penalty=1.1, frequency_penalty=0.2, max_tokens=60)),
        "stop string": (edit, SamplingParams(temperature=0, stop=("strip()",), max_tokens=100)),
        "short": (quote, SamplingParams(temperature=0, max_tokens=7)),  # ends inside a draft
        "json": (quote, SamplingParams(temperature=0, max_tokens=60, structured=StructuredOutput("json_object"))),
        "min tokens": (chats["capital"], SamplingParams(temperature=0, min_tokens=30, max_tokens=40, logprobs=0)),
    }
    plain, _, _ = run(smollm2_compact, requests)
    fast, engine, _ = run(smollm2_compact, requests, SPEC)
    for rid in requests:
        assert fast[rid] == plain[rid], rid
    assert plain["stop string"]["finish"] == "stop" and plain["short"]["finish"] == "length"
    assert len(plain["short"]["tokens"]) == 7 and plain["json"]["text"].lstrip().startswith("{")
    assert engine.stats().accepted_tokens_total > 0


def test_no_guesses_while_the_batch_is_large(smollm2_compact, chats):
    engine = LLMEngine(smollm2_compact, EngineConfig(kv_cache_gb=0.1, context=1024,
                                                     speculative=SpeculativeConfig(disable_by_batch_size=3)))
    for name, ids in chats.items():
        engine.add_request(ids, SamplingParams(temperature=0, max_tokens=60 if name == "edit" else 12), name)
    guesses_by_batch, execute = {}, engine.runner.execute

    def counting(out):  # every step's requests, and the guesses among them
        batch = len(out.scheduled)
        guesses_by_batch[batch] = guesses_by_batch.get(batch, 0) + sum(len(s.draft) for s in out.scheduled)
        return execute(out)

    engine.runner.execute = counting
    while engine.has_work():
        engine.step()
    assert guesses_by_batch[3] == 0 and guesses_by_batch[1] > 0


@pytest.fixture(scope="module")
def smollm2_mxfp4(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2 with MXFP4 weights: the same tokenizer, other numbers (its perplexity is 1.6x the GGUF's), so
    that its guesses are often but not always the model's tokens."""
    folder = tmp_path_factory.mktemp("draft") / "smollm2-mxfp4"
    convert(smollm2_gguf, folder, "mxfp4", source_name="smollm2")
    return folder


def test_a_draft_model_gives_the_same_replies_in_fewer_steps(smollm2_compact, chats, smollm2_mxfp4):
    """The draft guesses greedily; each guess is kept only where the model's own sampler draws that token, so
    greedy and seeded replies are the model's. A rejected guess leaves the draft's cache for the next step."""
    requests = {
        "edit": (chats["edit"], SamplingParams(temperature=0, max_tokens=100)),
        "capital": (chats["capital"], SamplingParams(temperature=0, max_tokens=40)),
        "seeded": (chats["quote"], SamplingParams(temperature=0.8, seed=5, max_tokens=40, logprobs=1)),
    }
    plain, _, plain_steps = run(smollm2_compact, requests)
    spec = SpeculativeConfig(method="draft_model", model=str(smollm2_mxfp4), num_speculative_tokens=4)
    fast, engine, fast_steps = run(smollm2_compact, requests, spec)
    for rid in requests:
        assert fast[rid] == plain[rid], rid
    stats = engine.stats()
    assert stats.draft_tokens_total > stats.accepted_tokens_total > 0.3 * stats.draft_tokens_total
    assert fast_steps < 0.7 * plain_steps
    assert stats.kv_usage == 0


def test_a_draft_model_with_another_tokenizer_is_refused(smollm2_compact, tiny_llama_gguf):
    spec = SpeculativeConfig(method="draft_model", model=str(tiny_llama_gguf))
    with pytest.raises(DeskpodError, match=r"the draft model .*tiny-llama.gguf does not share .*'s tokenizer"):
        LLMEngine(smollm2_compact, EngineConfig(kv_cache_gb=0.1, context=1024, speculative=spec))


def test_a_draft_model_not_in_the_store_is_named_as_the_draft(smollm2_compact):
    spec = SpeculativeConfig(method="draft_model", model="no-such-draft")
    with pytest.raises(DeskpodError, match=r"^the draft model \(speculative decoding's model\): .*no-such-draft"):
        LLMEngine(smollm2_compact, EngineConfig(kv_cache_gb=0.1, context=1024, speculative=spec))
