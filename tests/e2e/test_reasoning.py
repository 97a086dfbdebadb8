"""A harmony-speaking model (a tiny random gpt-oss, its tokenizer given harmony's special tokens and a harmony
chat template in chat_template.jinja, as OpenAI's folders have it) served and asked through the official
`openai` client: reasoning_effort reaches its template, the reply's fields are there, and a model whose
template takes no effort refuses it by name. What the reader does with a harmony reply is
tests/server/test_harmony.py's."""

from __future__ import annotations

import json

import openai
import pytest
from support.architectures import CASES, build_hf
from tokenizers import AddedToken, Tokenizer

HARMONY = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>"]
TEMPLATE = """{%- for m in messages -%}
{%- if loop.first %}<|start|>system<|message|>Reasoning: {{ reasoning_effort | default('medium') }}<|end|>{% endif -%}
<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>
{%- endfor -%}
{%- if add_generation_prompt %}<|start|>assistant{% endif -%}"""


@pytest.fixture(scope="module")
def harmony_model(serve, store, tmp_path_factory):
    case = CASES["gpt-oss"]
    folder = build_hf(type(case)(case.name, case.model_type, {**case.config, "vocab_size": 336}),
                      tmp_path_factory.mktemp("harmony") / "gpt-oss-harmony")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in HARMONY])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    ends = [tokenizer.token_to_id(t) for t in ("<|return|>", "<|call|>")]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ends}))
    store.pull(str(folder), name="gpt-oss-harmony", progress=False)
    return serve(["gpt-oss-harmony", "--kv-cache-gb", "0.05", "--ctx", "256"])


def test_reasoning_effort_reaches_the_template(harmony_model):
    client = harmony_model.client(max_retries=0)
    reply = client.chat.completions.create(
        model="gpt-oss-harmony", messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0,
        reasoning_effort="high", extra_body={"prompt_logprobs": 0})
    prompt = "".join(next(iter(p.values()))["decoded_token"] for p in reply.prompt_logprobs if p)
    assert "Reasoning: high" in prompt and prompt.endswith("<|start|>assistant")
    message = reply.choices[0].message
    assert hasattr(message, "reasoning_content")  # in the body, null or the analysis channel's text
    assert "<|channel|>" not in (message.content or "") and "<|channel|>" not in (message.reasoning_content or "")


def test_streamed_replies_carry_the_same_fields(harmony_model):
    client = harmony_model.client(max_retries=0)
    whole = client.chat.completions.create(model="gpt-oss-harmony", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model="gpt-oss-harmony", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=12, temperature=0, stream=True)
    content, reasoning = "", ""
    for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta
            content += delta.content or ""
            reasoning += getattr(delta, "reasoning_content", None) or ""
    assert content == (whole.choices[0].message.content or "")
    assert reasoning == (whole.choices[0].message.reasoning_content or "")


def test_a_model_without_reasoning_refuses_the_effort(server):
    client = server.client(max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       reasoning_effort="low")
    assert "reasoning_effort" in str(refused.value) and "takes no reasoning effort" in str(refused.value)
