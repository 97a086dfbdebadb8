"""/v1/completions over the engine: text or token-id prompts (one or several) -> n generations each -> one
body or SSE chunks. Choice i*n + j is prompt i's j-th completion, as in OpenAI's API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from starlette.responses import JSONResponse, Response

from deskpod.server.metrics import ServerMetrics
from deskpod.server.openai.completions.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from deskpod.server.openai.generation import Choices, generation_stream
from deskpod.server.openai.protocol import UsageInfo, clamp_logprob, now, prompt_logprobs_body, random_id
from deskpod.server.registry import ModelRegistry

if TYPE_CHECKING:
    from deskpod.engine.async_engine import AsyncLLM, RequestOutput
    from deskpod.engine.sampler import SamplingParams
    from deskpod.engine.async_engine import TokenLogprob as EngineLogprob


def completion_logprobs(tokens: Sequence[EngineLogprob | None], offset: int = 0, as_ids: bool = False,
                        first_token: str = "") -> CompletionLogprobs | None:
    """The legacy shape: parallel lists; `text_offset` counts characters from `offset` (the text already sent
    in earlier chunks); each `top_logprobs` dict holds the chosen token and the alternatives. A None entry is
    the prompt's first token (`first_token`), which nothing predicts."""
    result = CompletionLogprobs()
    for t in tokens:
        text = first_token if t is None else (f"token_id:{t.token_id}" if as_ids else t.token)
        result.text_offset.append(offset)
        result.tokens.append(text)
        if t is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
        else:
            top = {(f"token_id:{i}" if as_ids else s): clamp_logprob(lp) for i, s, lp in t.top}
            result.token_logprobs.append(clamp_logprob(t.logprob))
            result.top_logprobs.append({text: clamp_logprob(t.logprob)} | top)
        offset += len(t.token if t is not None else first_token)
    return result


def prompt_ids(engine: AsyncLLM, prompt: str | list[int], add_bos: bool) -> list[int]:
    """A text prompt tokenized (with the model's BOS when `add_bos`), or the ids as given (the engine checks them)."""
    if isinstance(prompt, str):
        return engine.tokenizer.encode(prompt, add_bos=None if add_bos else False, limit=engine.max_context)
    return list(prompt)


class Echo:
    """What `echo` puts before each of a prompt's completions: its text and, with logprobs, its tokens'."""

    def __init__(self, texts: list[str], first_tokens: list[str], logprobs: bool):
        self.texts, self.first_tokens, self.logprobs = texts, first_tokens, logprobs

    @classmethod
    def of(cls, request: CompletionRequest, engine: AsyncLLM, prompts: list[list[int]]) -> Echo:
        decode, token = engine.tokenizer.decode, engine.tokenizer.token_text
        texts = [decode(ids, skip_special=False) if request.echo else "" for ids in prompts]
        return cls(texts, [token(ids[0]) for ids in prompts], request.echo and request.logprobs is not None)

    def entries(self, out: RequestOutput) -> list[EngineLogprob | None]:
        return [None, *(out.prompt_logprobs or [])] if self.logprobs else []


def full_response(request: CompletionRequest, request_id: str, choices: list[list[RequestOutput]], n: int,
                  echo: Echo) -> CompletionResponse:
    out = []
    for index, outputs in enumerate(choices):
        prompt = index // n
        text = echo.texts[prompt] + "".join(o.text for o in outputs)
        logprobs = None
        if request.logprobs is not None:
            tokens = echo.entries(outputs[0]) + [t for o in outputs for t in o.logprobs or []]
            logprobs = completion_logprobs(tokens, 0, request.return_tokens_as_token_ids, echo.first_tokens[prompt])
        prompt_logprobs = prompt_logprobs_body(outputs[0].prompt_logprobs) if request.prompt_logprobs is not None else None
        out.append(CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=outputs[-1].finish_reason,
                                    prompt_logprobs=prompt_logprobs))
    prompt_tokens = sum(choices[p * n][-1].num_prompt_tokens for p in range(len(choices) // n))
    usage = UsageInfo.of(prompt_tokens, sum(c[-1].num_output_tokens for c in choices))
    return CompletionResponse(id=request_id, created=now(), model=request.model, choices=out, usage=usage)


async def chunks(request: CompletionRequest, request_id: str, outputs_in: AsyncIterator[tuple[int, RequestOutput]],
                 count: int, n: int, echo: Echo) -> AsyncIterator[CompletionResponse]:
    """From (choice index, output) pairs of `count` choices (n per prompt): one chunk per output that carries
    text, logprobs or the finish reason (the echo in each choice's first); with stream_options.include_usage,
    a last chunk with no choices and the usage."""
    created = now()
    sent, started = [0] * count, [False] * count
    prompt_tokens, outputs = [0] * count, [0] * count
    async for index, out in outputs_in:
        prompt = index // n
        prompt_tokens[index], outputs[index] = out.num_prompt_tokens, out.num_output_tokens
        head, tokens = "", list(out.logprobs or [])
        if not started[index]:
            started[index] = True
            head, tokens = echo.texts[prompt], echo.entries(out) + tokens
        if head or out.text or out.logprobs or out.finish_reason:
            logprobs = None
            if request.logprobs is not None:
                logprobs = completion_logprobs(tokens, sent[index], request.return_tokens_as_token_ids,
                                               echo.first_tokens[prompt])
            prompt_logprobs = prompt_logprobs_body(out.prompt_logprobs) if request.prompt_logprobs is not None else None
            choice = CompletionChoice(index=index, text=head + out.text, logprobs=logprobs, finish_reason=out.finish_reason,
                                      prompt_logprobs=prompt_logprobs)
            yield CompletionResponse(id=request_id, created=created, model=request.model, choices=[choice])
            sent[index] += len(head + out.text)
    if request.include_usage:
        usage = UsageInfo.of(sum(prompt_tokens[::n]), sum(outputs))
        yield CompletionResponse(id=request_id, created=created, model=request.model, choices=[], usage=usage)


class OpenAIServingCompletion:
    def __init__(self, models: ModelRegistry, metrics: ServerMetrics):
        self.models = models
        self.metrics = metrics

    async def create(self, request: CompletionRequest) -> Response:
        engine = self.models.llm(request.model)
        texts = request.prompts()
        prompts = await asyncio.to_thread(lambda: [prompt_ids(engine, p, request.add_special_tokens) for p in texts])
        if request.truncate_prompt_tokens:
            prompts = [ids[-request.truncate_prompt_tokens :] for ids in prompts]
        echo = Echo.of(request, engine, prompts)
        prompt_logprobs = request.logprobs if echo.logprobs else request.prompt_logprobs

        def params(prompt: int, choice: int) -> SamplingParams:
            room = engine.max_context - len(prompts[prompt])
            p = request.sampling_params(room, request.logprobs, choice=choice % request.n)
            return p if prompt_logprobs == p.prompt_logprobs else replace(p, prompt_logprobs=prompt_logprobs)

        engine_id = random_id("cmpl")  # unique in the engine, whatever id the client asked the reply to carry
        request_id = request.request_id or engine_id
        choices = await Choices.start(engine, prompts, request.n, params, engine_id,
                                      lambda: self.metrics.timer(request.model), "prompt")
        if request.stream:
            events = chunks(request, request_id, choices.stream(), len(choices.generations), request.n, echo)
            return generation_stream(choices, events)
        outputs = await choices.collect()
        return JSONResponse(full_response(request, request_id, outputs, request.n, echo).model_dump(mode="json"))
