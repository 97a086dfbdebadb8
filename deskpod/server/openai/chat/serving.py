"""/v1/chat/completions over the engine: messages -> chat template -> generate -> one body or SSE chunks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

from starlette.responses import JSONResponse, Response

from deskpod.errors import DeskpodError
from deskpod.server.errors import from_engine_error
from deskpod.server.metrics import ServerMetrics
from deskpod.server.openai.chat.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    ChunkChoice,
    DeltaMessage,
    TokenLogprob,
    TopLogprob,
)
from deskpod.server.openai.generation import Generation, GenerationStreamingResponse
from deskpod.server.openai.protocol import UsageInfo, clamp_logprob, now, random_id
from deskpod.server.registry import ModelRegistry

if TYPE_CHECKING:
    from deskpod.engine.async_engine import RequestOutput
    from deskpod.engine.async_engine import TokenLogprob as EngineLogprob


def chat_logprobs(tokens: Sequence[EngineLogprob] | None) -> ChoiceLogprobs | None:
    """The engine's per-token logprobs in the chat API's shape (`bytes` are the token's UTF-8 bytes)."""
    if tokens is None:
        return None
    return ChoiceLogprobs(
        content=[
            TokenLogprob(
                token=t.token,
                logprob=clamp_logprob(t.logprob),
                bytes=list(t.token.encode()),
                top_logprobs=[
                    TopLogprob(token=s, logprob=clamp_logprob(lp), bytes=list(s.encode())) for _, s, lp in t.top
                ],
            )
            for t in tokens
        ]
    )


def _joined_logprobs(outputs: Sequence[RequestOutput]) -> list[EngineLogprob] | None:
    if all(o.logprobs is None for o in outputs):
        return None
    return [t for o in outputs for t in o.logprobs or []]


def full_response(
    request: ChatCompletionRequest, request_id: str, outputs: Sequence[RequestOutput]
) -> ChatCompletionResponse:
    last = outputs[-1]
    choice = ChatChoice(
        message=AssistantMessage(content="".join(o.text for o in outputs)),
        logprobs=chat_logprobs(_joined_logprobs(outputs)),
        finish_reason=last.finish_reason,
    )
    usage = UsageInfo.of(last.num_prompt_tokens, last.num_output_tokens)
    return ChatCompletionResponse(id=request_id, created=now(), model=request.model, choices=[choice], usage=usage)


async def chunks(
    request: ChatCompletionRequest, request_id: str, outputs: AsyncIterator[RequestOutput]
) -> AsyncIterator[ChatCompletionChunk]:
    """The role first, then one chunk per output that carries text, logprobs or the finish reason;
    with stream_options.include_usage, a last chunk with no choices and the usage."""
    created = now()

    def chunk(choices: list[ChunkChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=request_id, created=created, model=request.model, choices=choices, usage=usage)

    yield chunk([ChunkChoice(delta=DeltaMessage(role="assistant", content=""))])
    last = None
    async for out in outputs:
        last = out
        if out.text or out.logprobs or out.finish_reason:
            delta = DeltaMessage(content=out.text) if out.text else DeltaMessage()
            yield chunk(
                [ChunkChoice(delta=delta, logprobs=chat_logprobs(out.logprobs), finish_reason=out.finish_reason)]
            )
    if request.include_usage and last is not None:
        yield chunk([], UsageInfo.of(last.num_prompt_tokens, last.num_output_tokens))


class OpenAIServingChat:
    def __init__(self, models: ModelRegistry, metrics: ServerMetrics):
        self.models = models
        self.metrics = metrics

    async def create(self, request: ChatCompletionRequest) -> Response:
        engine = self.models.llm(request.model)
        try:  # in a worker thread: a huge prompt must not stall the event loop
            prompt_ids = await asyncio.to_thread(engine.chat_prompt, [m.template_dict() for m in request.messages])
        except DeskpodError as e:  # the model's template refused these messages
            raise from_engine_error(e, "messages") from e
        params = request.sampling_params(engine.max_context - len(prompt_ids), request.logprobs_count())
        request_id = random_id("chatcmpl")
        timer = self.metrics.timer(request.model)
        generation = await Generation.start(engine, prompt_ids, params, request_id, timer, "messages")
        if request.stream:
            return GenerationStreamingResponse(generation, chunks(request, request_id, aiter(generation)))
        outputs = await generation.collect()
        return JSONResponse(full_response(request, request_id, outputs).model_dump(mode="json"))
