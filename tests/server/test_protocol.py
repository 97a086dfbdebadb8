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
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"best_of": 3}, "best_of"),  # other than n
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
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"tools": [{"type": "function", "function": {"name": "no spaces allowed"}}]}, "tools"),
        ({"logit_bias": {"x": 5}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"messages": [{"role": "user", "content": "x"}], "continue_final_message": True, "add_generation_prompt": False},
         "continue_final_message"),  # the last message is not the assistant's
        # fields other servers define that deskpod does not implement: refused by name
        ({"use_beam_search": True}, "use_beam_search"),
        ({"audio": {"voice": "alloy"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"mirostat": 2}, "mirostat"),
        ({"typical_p": 0.9}, "typical_p"),
        ({"logits_processors": ["x.y"]}, "logits_processors"),
    ],
)
def test_bad_chat_fields_are_refused_by_name(fields: dict, field: str) -> None:
    assert refused_param(**fields).split(".")[0] == field  # a dotted path into the field, where pydantic gives one


def refused_param(**fields) -> str | None:
    """The `param` the server's 400 names for a chat request with these fields."""
    from fastapi.exceptions import RequestValidationError

    from deskpod.server.errors import validation_error

    body = {"model": "smollm2", "messages": HI, **fields}
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest(**body)
    errors = [{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()]
    return validation_error(RequestValidationError(errors)).param


def test_the_defaults_of_unimplemented_fields_pass() -> None:
    # what clients send when they mean "nothing special"
    chat(tools=[], frequency_penalty=0, presence_penalty=0.0, echo=False, best_of=1, use_beam_search=False,
         modalities=["text"], typical_p=1.0, mirostat=0, store=False, service_tier="auto", logits_processors=None)


def test_fields_no_server_defines_are_ignored_and_logged(caplog) -> None:
    with caplog.at_level("WARNING", logger="deskpod.server"):
        chat(my_own_field=1, another=2)
    assert "ignored fields no server defines: another, my_own_field" in caplog.text


def test_honoured_fields_reach_the_sampling_params() -> None:
    params = chat(min_p=0.1, presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2, logit_bias={"7": -100},
                  min_tokens=3, stop_token_ids=[2], include_stop_str_in_output=True, allowed_token_ids=[1, 2, 7],
                  skip_special_tokens=False, seed=5).sampling_params(100, None)
    assert (params.min_p, params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.1, 0.5, -0.5, 1.2)
    assert params.logit_bias == {7: -100} and params.min_tokens == 3 and params.stop_token_ids == (2,)
    assert params.include_stop_str_in_output and params.allowed_token_ids == (1, 2, 7) and not params.skip_special_tokens
    assert chat(seed=5).sampling_params(100, None, choice=2).seed == 7  # each of n choices its own stream


def test_llama_server_names_are_honoured() -> None:
    params = chat(n_predict=9, repeat_penalty=1.1, repeat_last_n=64).sampling_params(100, None)
    assert (params.max_tokens, params.repetition_penalty, params.penalty_window) == (9, 1.1, 64)
    assert chat(repeat_penalty=1.3, repeat_last_n=0).sampling_params(100, None).repetition_penalty == 1.0  # 0: off
    assert chat(json_schema={"type": "object"}).structured().kind == "json_schema"
    assert chat(grammar='root ::= "a"').structured().kind == "gbnf"


@pytest.mark.parametrize(
    ("fields", "kind"),
    [
        ({"response_format": {"type": "json_object"}}, "json_object"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}, "json_schema"),
        ({"response_format": {"type": "text"}}, None),
        ({"guided_json": '{"type": "integer"}'}, "json_schema"),
        ({"guided_regex": "a+"}, "regex"),
        ({"guided_choice": ["a", "b"]}, "choice"),
        ({"guided_grammar": 'root ::= "a"'}, "gbnf"),
        ({"guided_grammar": 'start: "a"'}, "lark"),
        ({"structured_outputs": {"regex": "b+"}}, "regex"),
    ],
)
def test_structured_outputs_in_every_dialect(fields: dict, kind: str | None) -> None:
    spec = chat(**fields).structured()
    assert (spec.kind if spec else None) == kind


def test_one_structured_output_at_a_time() -> None:
    assert refused_param(guided_regex="a", response_format={"type": "json_object"}) == "guided_regex"
    with pytest.raises(ValidationError, match="response_format and guided_regex each constrain"):
        chat(guided_regex="a", response_format={"type": "json_object"})


@pytest.mark.parametrize(
    "messages", [[], [{"role": "robot", "content": "x"}],
                 [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]]
)
def test_bad_messages_are_refused(messages: list) -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest(model="m", messages=messages)
    assert info.value.errors()[0]["loc"][0] == "messages"


@pytest.mark.parametrize(
    ("prompt", "want"),
    [("Hello", ["Hello"]), ([1, 2, 3], [[1, 2, 3]]), (["Hello"], ["Hello"]), ([[4, 5]], [[4, 5]]),
     (["a", "b"], ["a", "b"]), ([[1], [2]], [[1], [2]])],
)
def test_completion_prompt_forms(prompt: object, want: object) -> None:
    request = CompletionRequest(model="m", prompt=prompt, logprobs=2)
    assert request.prompts() == want
    assert request.sampling_params(10, request.logprobs).logprobs == 2


@pytest.mark.parametrize("prompt", ["", [], ["a", ""], [[1], []], ["x"] * 65])
def test_completion_refuses_empty_and_too_many_prompts(prompt: object) -> None:
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
