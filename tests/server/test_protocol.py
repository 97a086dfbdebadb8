"""OpenAI request bodies -> SamplingParams, and what pydantic refuses (the server answers those with 400)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deskpod.server.openai.chat.protocol import ChatCompletionRequest
from deskpod.server.openai.completions.protocol import CompletionRequest
from deskpod.server.openai.embeddings.protocol import EmbeddingRequest

HI = [{"role": "user", "content": "Hi"}]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="smollm2", messages=HI, **fields)


def test_chat_defaults_are_openai_s() -> None:
    request = chat()
    params = request.sampling_params(room=100, logprobs=request.logprobs_count())
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (1.0, 1.0, 0, None)
    assert params.max_tokens == 100  # the context left after the prompt
    assert params.stop == () and params.logprobs is None and not request.stream and not request.include_usage


def test_chat_sampling_fields_map_one_to_one() -> None:
    request = chat(max_tokens=7, temperature=0, top_p=0.5, seed=3, stop="\n", top_k=4, ignore_eos=True)
    params = request.sampling_params(room=100, logprobs=None)
    assert (params.max_tokens, params.temperature, params.top_p, params.seed, params.top_k) == (7, 0, 0.5, 3, 4)
    assert params.stop == ("\n",) and params.ignore_eos
    assert chat(stop=["a", "b"]).sampling_params(1, None).stop == ("a", "b")


def test_max_completion_tokens_is_max_tokens_new_name() -> None:
    assert chat(max_completion_tokens=5).sampling_params(100, None).max_tokens == 5
    assert chat(max_tokens=5, max_completion_tokens=5).sampling_params(100, None).max_tokens == 5


def test_no_room_left_still_asks_for_a_token() -> None:
    # the engine, not SamplingParams, refuses a prompt that fills the context (PromptTooLong -> 400)
    assert chat().sampling_params(room=-3, logprobs=None).max_tokens == 1


@pytest.mark.parametrize(
    ("fields", "want"),
    [({}, None), ({"logprobs": True}, 0), ({"logprobs": True, "top_logprobs": 3}, 3)],
)
def test_chat_logprobs_count(fields: dict, want: int | None) -> None:
    assert chat(**fields).logprobs_count() == want


def test_stream_options() -> None:
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage
    assert not chat(stream=True).include_usage


def test_content_parts_and_developer_role_reach_the_template_as_text() -> None:
    request = ChatCompletionRequest(
        model="m",
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "there"}]},
        ],
    )
    assert [m.template_dict() for m in request.messages] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello, there"},
    ]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"n": 2}, "n"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream: true
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": [str(i) for i in range(17)]}, "stop"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
    ],
)
def test_bad_chat_fields_are_refused_by_name(fields: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        chat(**fields)
    assert info.value.errors()[0]["loc"][0] == field


def test_harmless_defaults_of_unsupported_fields_pass() -> None:
    chat(tools=[], frequency_penalty=0, presence_penalty=0.0, echo=False, best_of=1)


@pytest.mark.parametrize(
    "messages", [[], [{"role": "robot", "content": "x"}], [{"role": "user", "content": [{"type": "image_url"}]}]]
)
def test_bad_messages_are_refused(messages: list) -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest(model="m", messages=messages)
    assert info.value.errors()[0]["loc"][0] == "messages"


@pytest.mark.parametrize(
    ("prompt", "want"),
    [("Hello", "Hello"), ([1, 2, 3], [1, 2, 3]), (["Hello"], "Hello"), ([[4, 5]], [4, 5])],
)
def test_completion_prompt_forms(prompt: object, want: object) -> None:
    request = CompletionRequest(model="m", prompt=prompt, logprobs=2)
    assert request.prompt == want
    assert request.sampling_params(10, request.logprobs).logprobs == 2


@pytest.mark.parametrize("prompt", ["", [], ["a", "b"], [[1], [2]]])
def test_completion_refuses_empty_and_several_prompts(prompt: object) -> None:
    with pytest.raises(ValidationError) as info:
        CompletionRequest(model="m", prompt=prompt)
    assert info.value.errors()[0]["loc"][0] == "prompt"


def test_completion_logprobs_range() -> None:
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt="x", logprobs=21)


def test_embedding_inputs() -> None:
    assert EmbeddingRequest(model="m", input="one").texts() == ["one"]
    assert EmbeddingRequest(model="m", input=["a", "b"]).texts() == ["a", "b"]
    for bad in ([1, 2], [[1, 2]], []):
        with pytest.raises(ValidationError):
            EmbeddingRequest(model="m", input=bad)
    with pytest.raises(ValidationError):
        EmbeddingRequest(model="m", input="x", encoding_format="int8")
