"""/v1/completions over the engine: a text or token-id prompt -> generate -> one body or SSE chunks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

from starlette.responses import JSONResponse, Response

from deskpod.server.metrics import ServerMetrics
from deskpod.server.openai.completions.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from deskpod.server.openai.generation import Generation, GenerationStreamingResponse
from deskpod.server.openai.protocol import UsageInfo, clamp_logprob, now, random_id
from deskpod.server.registry import ModelRegistry

if TYPE_CHECKING:
    from deskpod.engine.async_engine import AsyncLLM, RequestOutput
    from deskpod.engine.async_engine import TokenLogprob as EngineLogprob


def completion_logprobs(tokens: Sequence[EngineLogprob] | None, offset: int = 0) -> CompletionLogprobs | None:
    """The legacy shape: parallel lists; `text_offset` counts characters from `offset` (the text already
    sent in earlier chunks); each `top_logprobs` dict holds the chosen token and the alternatives."""
    if tokens is None:
        return None
    result = CompletionLogprobs()
    for t in tokens:
        result.text_offset.append(offset)
        result.tokens.append(t.token)
        result.token_logprobs.append(clamp_logprob(t.logprob))
        result.top_logprobs.append({t.token: clamp_logprob(t.logprob)} | {s: clamp_logprob(lp) for _, s, lp in t.top})
        offset += len(t.token)
    return result


def prompt_ids(engine: AsyncLLM, prompt: str | list[int]) -> list[int]:
    return engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)  # the engine checks ids


def full_response(request: CompletionRequest, request_id: str, outputs: Sequence[RequestOutput]) -> CompletionResponse:
    last = outputs[-1]
    logprobs = None
    if any(o.logprobs is not None for o in outputs):
        logprobs = completion_logprobs([t for o in outputs for t in o.logprobs or []])
    choice = CompletionChoice(
        text="".join(o.text for o in outputs), logprobs=logprobs, finish_reason=last.finish_reason
    )
    usage = UsageInfo.of(last.num_prompt_tokens, last.num_output_tokens)
    return CompletionResponse(id=request_id, created=now(), model=request.model, choices=[choice], usage=usage)


async def chunks(
    request: CompletionRequest, request_id: str, outputs: AsyncIterator[RequestOutput]
) -> AsyncIterator[CompletionResponse]:
    """One chunk per output that carries text, logprobs or the finish reason; with
    stream_options.include_usage, a last chunk with no choices and the usage."""
    created, sent, last = now(), 0, None
    async for out in outputs:
        last = out
        if out.text or out.logprobs or out.finish_reason:
            choice = CompletionChoice(
                text=out.text, logprobs=completion_logprobs(out.logprobs, sent), finish_reason=out.finish_reason
            )
            yield CompletionResponse(id=request_id, created=created, model=request.model, choices=[choice])
            sent += len(out.text)
    if request.include_usage and last is not None:
        usage = UsageInfo.of(last.num_prompt_tokens, last.num_output_tokens)
        yield CompletionResponse(id=request_id, created=created, model=request.model, choices=[], usage=usage)


class OpenAIServingCompletion:
    def __init__(self, models: ModelRegistry, metrics: ServerMetrics):
        self.models = models
        self.metrics = metrics

    async def create(self, request: CompletionRequest) -> Response:
        engine = self.models.llm(request.model)
        ids = await asyncio.to_thread(prompt_ids, engine, request.single_prompt())  # off the event loop
        params = request.sampling_params(engine.max_context - len(ids), request.logprobs)
        request_id = random_id("cmpl")
        timer = self.metrics.timer(request.model)
        generation = await Generation.start(engine, ids, params, request_id, timer, "prompt")
        if request.stream:
            return GenerationStreamingResponse(generation, chunks(request, request_id, aiter(generation)))
        outputs = await generation.collect()
        return JSONResponse(full_response(request, request_id, outputs).model_dump(mode="json"))
