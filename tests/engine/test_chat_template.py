"""Chat templates come from model files, so they are untrusted code: rendered as transformers renders them,
inside Jinja's immutable sandbox, with every failure turned into one clear ChatTemplateError."""

from __future__ import annotations

import pytest

from deskpod.engine.chat_template import CHATML, ChatTemplateError, render_chat

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


def test_smollm2_template_renders_what_llama_cpp_rendered(smollm2_tokenizer, reference):
    tok = smollm2_tokenizer
    for r in reference["results"]:
        if r["mode"] == "chat":
            assert render_chat(tok.chat_template, r["messages"], bos_token=tok.special.bos_text) == r["rendered_prompt"]


def test_missing_template_falls_back_to_chatml():
    want = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(None, MESSAGES) == render_chat("", MESSAGES) == render_chat(CHATML, MESSAGES) == want
    assert render_chat(None, MESSAGES, add_generation_prompt=False) == want.removesuffix("<|im_start|>assistant\n")


def test_special_tokens_and_transformers_helpers_are_available():
    template = (
        "{{ bos_token }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m | tojson }}{% endfor %}{{ eos_token }}{{ strftime_now('%Y') | length }}"
    )
    messages = [{"role": "user", "content": "é"}, {"role": "user", "content": "skipped"}]
    out = render_chat(template, messages, bos_token="<s>", eos_token="</s>")
    assert out == '<s>{"role": "user", "content": "é"}</s>4'  # tojson keeps non-ASCII, as transformers does


def test_raise_exception_reports_the_template_message():
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with a user turn') }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="chat template: Conversations must start with a user turn"):
        render_chat(template, MESSAGES)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # the classic escape to arbitrary classes
        "{{ cycler.__init__.__globals__.os }}",  # globals of a function
        "{{ messages.append({'role': 'assistant', 'content': 'injected'}) }}",  # mutating what we passed in
        "{% set _ = messages[0].update({'content': 'changed'}) %}",
        "{{ range(10 ** 9) | list | length }}",  # a huge loop
    ],
)
def test_sandbox_blocks_escapes_and_mutation(template):
    messages = [dict(m) for m in MESSAGES]
    with pytest.raises(ChatTemplateError, match="failed on these messages: (SecurityError|OverflowError)"):
        render_chat(template, messages)
    assert messages == MESSAGES


def test_unsafe_attribute_renders_as_nothing_rather_than_leaking():
    assert render_chat("[{{ ''.__class__ }}]", MESSAGES) == "[]"


def test_template_that_does_not_compile():
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat("{% for m in messages %}{{ m['content'] }}", MESSAGES)


def test_template_that_fails_on_the_messages():
    with pytest.raises(ChatTemplateError, match="failed on these messages: .*"):
        render_chat("{{ messages[5]['content'] }}", MESSAGES)
