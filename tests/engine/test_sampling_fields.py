"""The sampling settings agents and other servers' clients send: their arithmetic on hand-made logits, and
their effect through the engine on the real SmolLM2 (penalties, bias, masks, min_tokens, stop tokens, prompt
logprobs, structured outputs, n choices sharing a prompt's KV blocks)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from support.loading import logits_of

from deskpod.engine.config import EngineConfig
from deskpod.engine.engine import LLMEngine
from deskpod.engine.generate import generate
from deskpod.engine.sampler import InvalidSamplingParams, Sampler, SamplingParams, StructuredOutput
from deskpod.errors import InvalidRequest

LOGITS = torch.tensor([2.0, 1.0, -1.0, 0.5, 3.0, -2.0])
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                         "population": {"type": "integer", "minimum": 0, "maximum": 10**8}},
        "required": ["city", "population"], "additionalProperties": False}


def processed(params: SamplingParams, prompt=(), output=(), end_ids=frozenset()) -> torch.Tensor:
    sampler = Sampler(params, list(prompt), end_ids)
    sampler.output_ids = list(output)
    return sampler.processed(LOGITS)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    out = processed(SamplingParams(repetition_penalty=2.0), prompt=[0, 2], output=[4])
    assert out.tolist() == [1.0, 1.0, -2.0, 0.5, 1.5, -2.0]


def test_frequency_and_presence_penalties_count_generated_tokens_only():
    out = processed(SamplingParams(frequency_penalty=0.5, presence_penalty=1.0), prompt=[1, 1, 1], output=[0, 0, 3])
    assert out.tolist() == [2.0 - 1.0 - 1.0, 1.0, -1.0, 0.5 - 0.5 - 1.0, 3.0, -2.0]


def test_a_penalty_window_counts_the_last_tokens_of_prompt_and_reply():
    # llama.cpp's repeat_last_n: the prompt's early tokens fall out of the window
    out = processed(SamplingParams(frequency_penalty=1.0, penalty_window=3), prompt=[0, 0, 1], output=[1, 3])
    assert out.tolist() == [2.0, 1.0 - 2.0, -1.0, 0.5 - 1.0, 3.0, -2.0]


def test_logit_bias_and_allowed_token_ids():
    assert processed(SamplingParams(logit_bias={5: 100.0, 4: -100.0})).argmax() == 5
    out = processed(SamplingParams(allowed_token_ids=(1, 2)))
    assert torch.isinf(out[[0, 3, 4, 5]]).all() and out[1] == 1.0 and out[2] == -1.0


def test_min_tokens_holds_back_the_end_tokens():
    params = SamplingParams(min_tokens=2, temperature=0)
    assert processed(params, output=[1], end_ids=frozenset({4})).argmax() == 0  # 4 would end it: not yet
    assert processed(params, output=[1, 2], end_ids=frozenset({4})).argmax() == 4


def test_min_p_keeps_tokens_near_the_best():
    sampler = Sampler(SamplingParams(temperature=1.0, min_p=0.5, seed=0))
    # p(4) = e^3 / Z and p(0) = e^2 / Z = 0.37 p(4) < 0.5 p(4): only token 4 survives
    assert {sampler(LOGITS) for _ in range(50)} == {4}


def test_a_mask_that_excludes_everything_is_the_request_s_error():
    sampler = Sampler(SamplingParams(allowed_token_ids=(4,), min_tokens=1), end_ids=frozenset({4}))
    with pytest.raises(InvalidSamplingParams, match="no token is allowed"):
        sampler(LOGITS)


def test_a_near_zero_repetition_penalty_never_turns_a_masked_token_into_nan():
    # 5e-324 is a float32 zero: -inf (masked) * 0 would be NaN, and argmax picks a NaN
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=5e-324, allowed_token_ids=(1,)), prompt_ids=[0, 5])
    out = sampler.processed(LOGITS)
    assert not out.isnan().any() and sampler(LOGITS) == 1


def test_a_near_zero_repetition_penalty_with_a_low_temperature_still_samples():
    # 4e-45 is a float32 denormal: a seen positive logit becomes float32's largest, and / 0.5 would overflow
    sampler = Sampler(SamplingParams(temperature=0.5, seed=0, repetition_penalty=4e-45), prompt_ids=[0])
    assert {sampler(LOGITS) for _ in range(10)} == {0}  # the penalised-to-certain token, every time


@pytest.fixture(scope="module")
def engine_for(smollm2_compact):
    return lambda **kw: LLMEngine(smollm2_compact, EngineConfig(kv_cache_gb=0.2, context=1024, **kw))


@pytest.fixture(scope="module")
def question(smollm2_compact):
    return smollm2_compact.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])


def complete(lm, ids, **params):
    return generate(lm, ids, SamplingParams(temperature=0, **params))


def test_stop_token_ids_end_the_reply_without_their_text_unless_asked(smollm2_compact, question):
    plain = complete(smollm2_compact, question, max_tokens=12)
    stop = plain.token_ids[4]
    cut = complete(smollm2_compact, question, max_tokens=12, stop_token_ids=(stop,))
    assert cut.token_ids == plain.token_ids[:4] and cut.finish_reason == "stop"
    kept = complete(smollm2_compact, question, max_tokens=12, stop_token_ids=(stop,), include_stop_str_in_output=True)
    assert kept.token_ids == plain.token_ids[:5] and kept.text == smollm2_compact.tokenizer.decode(plain.token_ids[:5])


def test_stop_strings_kept_with_include_stop_str_in_output(smollm2_compact, question):
    plain = complete(smollm2_compact, question, max_tokens=12)
    word = plain.text.split()[2]
    kept = complete(smollm2_compact, question, max_tokens=12, stop=(word,), include_stop_str_in_output=True)
    assert kept.text.endswith(word) and kept.text == plain.text[: plain.text.index(word) + len(word)]


def test_min_tokens_goes_past_the_end_of_generation(smollm2_compact):
    question = smollm2_compact.tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}])
    plain = complete(smollm2_compact, question, max_tokens=64)
    assert plain.finish_reason == "stop"  # the model ends by itself ...
    longer = complete(smollm2_compact, question, max_tokens=64, min_tokens=len(plain.token_ids) + 5)
    assert len(longer.token_ids) >= len(plain.token_ids) + 5  # ... but not before min_tokens


def test_prompt_logprobs_are_the_model_s(smollm2_float32, smollm2_compact, question):
    out = generate(smollm2_float32, question, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2))
    expected = torch.log_softmax(logits_of(smollm2_float32, question), dim=-1)
    assert len(out.prompt_logprobs) == len(question) - 1
    for position, entry in enumerate(out.prompt_logprobs, start=1):
        assert entry.token_id == question[position]
        assert abs(entry.logprob - float(expected[position - 1, entry.token_id])) < 1e-4
        assert entry.rank == 1 + int((expected[position - 1] > expected[position - 1, entry.token_id]).sum())
        assert len(entry.top) == 2


def test_prompt_logprobs_survive_chunked_prefill(smollm2_float32, question):
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    whole = generate(smollm2_float32, question, params)
    chunked = generate(smollm2_float32, question, params, EngineConfig(weights="float32", max_num_batched_tokens=7))
    assert [e.token_id for e in chunked.prompt_logprobs] == [e.token_id for e in whole.prompt_logprobs]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(whole.prompt_logprobs, chunked.prompt_logprobs)) < 1e-4


def test_n_copies_of_a_prompt_share_its_kv_blocks(engine_for, question):
    engine = engine_for()
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=4)
    engine.add_request(question, params, "a")
    engine.add_request(question, SamplingParams(temperature=1.0, seed=4, max_tokens=4), "b", after="a")
    first = engine.scheduler.schedule()
    assert [s.request_id for s in first.scheduled] == ["a"]  # b waits for a's prompt
    engine.scheduler.update(first, engine.runner.execute(first).tokens)
    second = engine.scheduler.schedule()
    b = next(s for s in second.scheduled if s.request_id == "b")
    full_blocks = (len(question) - 1) // 16
    assert b.start == full_blocks * 16 > 0  # only the last, partial block is computed again
    assert list(b.block_table[:full_blocks]) == engine.scheduler.requests["a"].block_ids[:full_blocks]


@pytest.mark.parametrize(
    ("spec", "check"),
    [
        (StructuredOutput("json_schema", json.dumps(CITY)), lambda text: jsonschema.validate(json.loads(text), CITY) is None),
        (StructuredOutput("json_object"), lambda text: isinstance(json.loads(text), dict)),
        (StructuredOutput("regex", r"\d{3}-\d{4}"), lambda text: re.fullmatch(r"[0-9]{3}-[0-9]{4}", text)),
        (StructuredOutput("choice", json.dumps(["Paris", "Lyon", "Nice"])), lambda text: text in ("Paris", "Lyon", "Nice")),
        (StructuredOutput("gbnf", 'root ::= "The answer is " [0-9]+ "."'), lambda text: re.fullmatch(r"The answer is [0-9]+\.", text)),
        (StructuredOutput("lark", 'start: "yes" | "no"'), lambda text: text in ("yes", "no")),
    ],
    ids=["json_schema", "json_object", "regex", "choice", "gbnf", "lark"],
)
def test_structured_outputs_hold(smollm2_compact, spec, check):
    # a 135M model, asked for a small object (asked for more, it can list keys until max_tokens)
    question = smollm2_compact.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Reply with a JSON object with a single key city."}])
    out = complete(smollm2_compact, question, max_tokens=60, structured=spec)
    assert out.finish_reason == "stop", out.text  # the grammar ended it, through the end-of-generation token
    assert check(out.text), out.text


def test_a_structured_output_survives_sampling(smollm2_compact, question):
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 2, "maxItems": 4}
    spec = StructuredOutput("json_schema", json.dumps(schema))
    for seed in range(3):  # hot sampling, where the model alone would wander anywhere
        out = generate(smollm2_compact, question, SamplingParams(temperature=1.5, seed=seed, max_tokens=100, structured=spec))
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)


def test_a_bad_grammar_is_refused_by_name(engine_for, question):
    engine = engine_for()
    with pytest.raises(InvalidRequest, match="regex"):
        engine.add_request(question, SamplingParams(structured=StructuredOutput("regex", "(unclosed")))
    with pytest.raises(InvalidRequest, match="GBNF"):
        engine.add_request(question, SamplingParams(structured=StructuredOutput("gbnf", "root ::= undefined-rule")))


def test_token_ids_outside_the_vocabulary_are_refused_by_field(engine_for, question):
    engine = engine_for()
    for field, value in [("stop_token_ids", (10**6,)), ("logit_bias", {10**6: 1.0}), ("allowed_token_ids", (10**6,))]:
        with pytest.raises(InvalidRequest, match=f"^{field}: token id 1000000"):
            engine.add_request(question, SamplingParams(**{field: value}))


@pytest.mark.parametrize("params", [{"ignore_eos": True}, {"min_tokens": 5}], ids=["ignore_eos", "min_tokens"])
def test_a_complete_structured_output_ends_the_request(smollm2_compact, question, params):
    # nothing may follow "Paris": the grammar's end outranks ignore_eos and min_tokens
    spec = StructuredOutput("choice", json.dumps(["Paris"]))
    out = complete(smollm2_compact, question, max_tokens=20, structured=spec, **params)
    assert (out.text, out.finish_reason) == ("Paris", "stop")
