"""deskpod.LLM, the in-process API, on the real SmolLM2 taken from the session store by name."""

from __future__ import annotations

import pytest

import deskpod
from deskpod.errors import ModelNotFound

GREEDY = deskpod.SamplingParams(temperature=0, max_tokens=4)


@pytest.fixture(scope="module")
def llm(smollm2_gguf):  # smollm2_gguf: pulled into the session store, so the name resolves without a download
    return deskpod.LLM("smollm2")


def test_chat_prompt_is_llama_cpp_s(llm, reference):
    for r in reference["results"]:
        if r["mode"] == "chat":
            assert llm.chat_prompt(r["messages"]) == r["prompt_token_ids"]


def test_generate_takes_text_ids_or_a_list_of_them(llm, reference):
    [raw] = [r for r in reference["results"] if r["mode"] == "raw" and r["prompt"] == "The capital of France is"]
    [from_text] = llm.generate(raw["prompt"], GREEDY)
    [from_ids] = llm.generate(raw["prompt_token_ids"], GREEDY)
    assert from_text.prompt_token_ids == from_ids.prompt_token_ids == raw["prompt_token_ids"]
    assert from_text.text == from_ids.text == " Paris.\n\n"
    both = llm.generate(["Write a haiku about the ocean.", raw["prompt_token_ids"]], GREEDY)
    assert [c.text for c in both] == ["\n\nThe ocean", " Paris.\n\n"]


def test_chat(llm):
    out = llm.chat([{"role": "user", "content": "The capital of France is"}], GREEDY)
    assert out.text == "L'aujour" and out.finish_reason == "length"


def test_unknown_model_name(smollm2_gguf):
    with pytest.raises(ModelNotFound, match="smollm2"):  # the message lists what there is
        deskpod.LLM("no-such-model")


def test_generate_returns_the_logprobs_asked_for(smollm2_gguf, reference):
    import torch
    from support.loading import logits_of

    llm = deskpod.LLM("smollm2", weights="float32")  # exact: the same logits whatever the batch
    [raw] = [r for r in reference["results"] if r["mode"] == "raw" and r["prompt"] == "The capital of France is"]
    [out] = llm.generate(raw["prompt_token_ids"], deskpod.SamplingParams(temperature=0, max_tokens=5, logprobs=3))
    assert len(out.logprobs) == len(out.token_ids) == 5
    ids = raw["prompt_token_ids"] + out.token_ids
    expected = torch.log_softmax(logits_of(llm.loaded, ids)[len(raw["prompt_token_ids"]) - 1 : -1], dim=-1)
    for step, lp in enumerate(out.logprobs):
        assert lp.token_id == out.token_ids[step] == lp.top[0][0]  # greedy: the most likely token
        assert abs(lp.logprob - float(expected[step, lp.token_id])) < 1e-4
        assert [t for t, _, _ in lp.top] == expected[step].topk(3).indices.tolist()
    assert llm.generate(raw["prompt_token_ids"], GREEDY)[0].logprobs is None  # none unless asked


# Half precision against float32, both with the weights expanded (compact mode rounds activations to int8,
# which turns a small change in them into a larger one). The chosen tokens' log-probabilities move by about
# 2^-mantissa bits times the depth: bfloat16 keeps 8 bits, float16 11.
@pytest.mark.parametrize("dtype, tolerance", [("bfloat16", 0.15), ("float16", 0.02)])
def test_half_precision_runs_in_that_precision_and_agrees(smollm2_gguf, dtype, tolerance):
    import torch

    full = deskpod.LLM("smollm2", weights="float32")
    half = deskpod.LLM("smollm2", weights="float32", dtype=dtype)
    assert {p.dtype for p in half.loaded.model.parameters()} == {getattr(torch, dtype)}
    params = deskpod.SamplingParams(temperature=0, max_tokens=5, logprobs=0)
    [a], [b] = full.generate("The capital of France is", params), half.generate("The capital of France is", params)
    assert b.token_ids == a.token_ids
    assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)) < tolerance


def test_sampling_params_refuse_values_of_the_wrong_type():
    for field, value in [("logprobs", True), ("max_tokens", 2.5), ("top_k", "5"), ("temperature", None)]:
        with pytest.raises(deskpod.errors.DeskpodError, match=field):
            deskpod.SamplingParams(**{field: value})
