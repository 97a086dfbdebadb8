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
