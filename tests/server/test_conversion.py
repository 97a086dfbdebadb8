"""Engine outputs -> OpenAI response bodies and stream chunks; engine and validation errors -> error bodies."""

from __future__ import annotations

import asyncio
import base64
import math
from collections.abc import AsyncIterator

import numpy as np
import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from deskpod.embed.embedder import Embedding
from deskpod.engine.async_engine import RequestOutput, TokenLogprob
from deskpod.engine.sampler import InvalidSamplingParams
from deskpod.engine.scheduler import QueueFull
from deskpod.errors import DeskpodError, InvalidRequest, ModelNotFound, PromptTooLong
from deskpod.server.errors import RETRY_AFTER_S, from_engine_error, validation_error
from deskpod.server.openai.chat import serving as chat_serving
from deskpod.server.openai.chat.protocol import ChatCompletionRequest
from deskpod.server.openai.chat.serving import chat_logprobs
from deskpod.server.openai.completions import serving as completion_serving
from deskpod.server.openai.completions.protocol import CompletionRequest
from deskpod.server.openai.completions.serving import completion_logprobs
from deskpod.server.openai.embeddings.protocol import EmbeddingRequest
from deskpod.server.openai.embeddings.serving import response as embedding_response
from deskpod.server.openai.generation import sse
from deskpod.server.openai.protocol import LOGPROB_FLOOR


def lp(token: str, logprob: float, *top: tuple[str, float]) -> TokenLogprob:
    return TokenLogprob(7, token, logprob, tuple((9, s, v) for s, v in top))


def output(
    text: str, n_out: int, finish: str | None = None, logprobs: list | None = None, tokens: int = 1
) -> RequestOutput:
    return RequestOutput("r", [1] * tokens, text, finish, logprobs, 5, n_out, 10.0, 10.5)


OUTPUTS = [
    output("Hel", 1, logprobs=[lp("Hel", -0.5, ("Hel", -0.5), ("Hi", -1.0))]),
    output("lo", 2, logprobs=[lp("lo", -float("inf"), ("lo", -0.1), ("w", -3.0))]),
    output("", 2, "stop", tokens=0),  # the end-of-sequence token: no text, not counted
]


async def _aiter(items: list) -> AsyncIterator:
    for item in items:
        yield item


def _indexed(outputs: list) -> AsyncIterator:
    return _aiter([(0, out) for out in outputs])


def _collect(agen: AsyncIterator) -> list:
    async def run() -> list:
        return [x async for x in agen]

    return asyncio.run(run())


def test_chat_full_response_joins_text_logprobs_and_counts_usage() -> None:
    request = ChatCompletionRequest(
        model="smollm2", messages=[{"role": "user", "content": "Hi"}], logprobs=True, top_logprobs=2
    )
    body = chat_serving.full_response(request, "chatcmpl-1", [OUTPUTS])
    choice = body.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", "Hello", "stop")
    assert body.usage.model_dump() == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert [t.token for t in choice.logprobs.content] == ["Hel", "lo"]
    assert choice.logprobs.content[1].logprob == LOGPROB_FLOOR  # -inf is not JSON
    assert [t.token for t in choice.logprobs.content[0].top_logprobs] == ["Hel", "Hi"]
    assert choice.logprobs.content[0].bytes == list(b"Hel")
    assert body.model == "smollm2" and body.object == "chat.completion" and body.id == "chatcmpl-1"


def test_chat_chunks_role_first_then_deltas_then_usage() -> None:
    request = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "Hi"}], stream=True, stream_options={"include_usage": True}
    )
    chunks = _collect(chat_serving.chunks(request, "c", _indexed(OUTPUTS), 1))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].delta.content for c in chunks[1:3]] == ["Hel", "lo"]
    assert chunks[3].choices[0].finish_reason == "stop" and chunks[3].choices[0].delta.content is None
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_chunks_without_usage() -> None:
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "Hi"}], stream=True)
    chunks = _collect(chat_serving.chunks(request, "c", _indexed(OUTPUTS), 1))
    assert len(chunks) == 4 and chunks[-1].choices[0].finish_reason == "stop"


def test_chat_without_logprobs_has_none() -> None:
    assert chat_logprobs(None) is None
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "Hi"}])
    plain = [output("Hi", 1), output("", 1, "length", tokens=0)]
    assert chat_serving.full_response(request, "c", [plain]).choices[0].logprobs is None


def test_completion_logprobs_legacy_shape() -> None:
    result = completion_logprobs([lp("Hel", -0.5, ("Hi", -1.0)), lp("lo", -0.25)], offset=3)
    assert result.tokens == ["Hel", "lo"]
    assert result.token_logprobs == [-0.5, -0.25]
    assert result.text_offset == [3, 6]
    assert result.top_logprobs == [{"Hel": -0.5, "Hi": -1.0}, {"lo": -0.25}]


def test_completion_response_and_stream() -> None:
    request = CompletionRequest(model="m", prompt="x", logprobs=1, stream=True, stream_options={"include_usage": True})
    no_echo = completion_serving.Echo([""], ["x"], False)
    body = completion_serving.full_response(request, "cmpl-1", [OUTPUTS], 1, no_echo)
    assert (body.choices[0].text, body.choices[0].finish_reason, body.usage.completion_tokens) == ("Hello", "stop", 2)
    assert body.choices[0].logprobs.tokens == ["Hel", "lo"]
    chunks = _collect(completion_serving.chunks(request, "cmpl-1", _indexed(OUTPUTS), 1, 1, no_echo))
    assert [c.choices[0].text for c in chunks[:3]] == ["Hel", "lo", ""]
    assert chunks[1].choices[0].logprobs.text_offset == [3]  # counted over the whole completion
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 5


def test_sse_framing() -> None:
    assert sse("[DONE]") == "data: [DONE]\n\n"
    assert sse({"a": 1}) == 'data: {"a": 1}\n\n'


def test_embeddings_float_and_base64() -> None:
    vectors = [Embedding([0.5, -0.25, 1.0], 3), Embedding([0.0, 1.0, 0.0], 4)]
    plain = embedding_response(EmbeddingRequest(model="minilm", input=["a", "b"]), vectors)
    assert [d.embedding for d in plain.data] == [[0.5, -0.25, 1.0], [0.0, 1.0, 0.0]]
    assert [d.index for d in plain.data] == [0, 1] and plain.usage.prompt_tokens == 7
    packed = embedding_response(EmbeddingRequest(model="minilm", input=["a", "b"], encoding_format="base64"), vectors)
    decoded = np.frombuffer(base64.b64decode(packed.data[0].embedding), dtype="<f4")
    assert decoded.tolist() == [0.5, -0.25, 1.0]


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (QueueFull("full"), 429, "rate_limit_exceeded"),
        (PromptTooLong("long"), 400, "context_length_exceeded"),
        (InvalidSamplingParams("top_p must be in (0, 1]"), 400, "invalid_value"),
        (InvalidRequest("token id 99999 is outside the vocabulary"), 400, "invalid_value"),
        (ModelNotFound("no such model"), 404, "model_not_found"),
        (DeskpodError("anything else"), 400, None),
    ],
)
def test_engine_errors_map_to_statuses(error: DeskpodError, status: int, code: str | None) -> None:
    api = from_engine_error(error, "prompt")
    assert (api.status, api.code, api.message, api.param) == (status, code, str(error), "prompt")
    if status == 429:
        assert api.headers == {"Retry-After": str(RETRY_AFTER_S)}
        assert api.type == "rate_limit_error"


def _request_error(**fields) -> RequestValidationError:
    try:
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "Hi"}], **fields)
    except ValidationError as e:
        return RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()])
    raise AssertionError("the request was valid")


def test_validation_errors_become_400_naming_the_field() -> None:
    api = validation_error(_request_error(temperature=9))
    assert (api.status, api.param, api.type) == (400, "temperature", "invalid_request_error")
    assert api.message.startswith("temperature: ") and "2" in api.message
    api = validation_error(_request_error(n=0))
    assert api.param == "n" and api.message.startswith("n: ")
    body = api.response().body
    assert b'"param":"n"' in body and b'"code":"invalid_value"' in body
    api = validation_error(_request_error(use_beam_search=True))  # refused by a model validator, for the field
    assert api.param == "use_beam_search" and "not supported" in api.message


def test_logprob_floor_is_finite() -> None:
    assert math.isfinite(LOGPROB_FLOOR)
