"""/v1/chat/completions over the engine: messages -> chat template -> n generations -> one body or SSE chunks,
with the model's tool calls read out of its replies."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from starlette.responses import JSONResponse, Response

from deskpod.engine.chat_template import renders_tools
from deskpod.engine.sampler import SamplingParams, StructuredOutput
from deskpod.errors import DeskpodError
from deskpod.server.errors import APIError, from_engine_error
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
    FunctionCall,
    NamedToolChoice,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
)
from deskpod.server.openai.chat.harmony import HarmonyReader, speaks_harmony
from deskpod.server.openai.chat.tool_calls import Call, ForcedReader, ToolCallReader, call_id, forced_schema, markers, reader_for
from deskpod.server.openai.generation import Choices, generation_stream
from deskpod.server.openai.protocol import UsageInfo, clamp_logprob, now, prompt_logprobs_body, random_id
from deskpod.server.registry import ModelRegistry

if TYPE_CHECKING:
    from deskpod.engine.async_engine import AsyncLLM, RequestOutput
    from deskpod.engine.async_engine import TokenLogprob as EngineLogprob


def token_text(t: EngineLogprob | tuple, as_ids: bool) -> str:
    token_id, text = (t.token_id, t.token) if not isinstance(t, tuple) else t[:2]
    return f"token_id:{token_id}" if as_ids else text


def chat_logprobs(tokens: Sequence[EngineLogprob] | None, as_ids: bool = False) -> ChoiceLogprobs | None:
    """The engine's per-token logprobs in the chat API's shape (`bytes` are the token's UTF-8 bytes); with
    `as_ids` (vLLM's return_tokens_as_token_ids) each token reads "token_id:<id>"."""
    if tokens is None:
        return None
    return ChoiceLogprobs(
        content=[
            TokenLogprob(
                token=token_text(t, as_ids),
                logprob=clamp_logprob(t.logprob),
                bytes=list(t.token.encode()),
                top_logprobs=[
                    TopLogprob(token=token_text(alt, as_ids), logprob=clamp_logprob(alt[2]), bytes=list(alt[1].encode()))
                    for alt in t.top
                ],
            )
            for t in tokens
        ]
    )


@dataclass(frozen=True)
class ToolPlan:
    """How a request's tools reach the model and come back: `reader()` makes a reader for one choice's reply
    (None: no tool calls are read), `structured` is the JSON a forced call is constrained to."""

    reader: Callable[[], ToolCallReader] | None = None
    structured: StructuredOutput | None = None
    keep_special: bool = False  # the model's call markers are special tokens: keep them in the text

    @classmethod
    def of(cls, request: ChatCompletionRequest, engine: AsyncLLM) -> ToolPlan:
        template = request.chat_template or engine.tokenizer.chat_template or ""
        if request.reasoning_effort is not None and "reasoning_effort" not in template:
            raise APIError(400, f"{request.model}'s chat template takes no reasoning effort: leave reasoning_effort "
                           "out", param="reasoning_effort")
        tools = [t.model_dump(exclude_none=True) for t in request.tools or []] if request.calls_tools else []
        names = {t["function"]["name"] for t in tools}
        forced = request.tool_choice == "required" or isinstance(request.tool_choice, NamedToolChoice)
        if speaks_harmony(template) and not forced:  # its reasoning, answer and calls are on channels: read them
            return cls(lambda: HarmonyReader(names), None, keep_special=True)
        if not request.calls_tools:
            return cls()
        if not renders_tools(template):  # the model would call tools it was never shown
            raise APIError(400, f"{request.model}'s chat template does not show tools to the model: describe them in "
                           "a message, or send a chat_template that renders `tools`", param="tools")
        choice = request.tool_choice
        if choice == "required" or isinstance(choice, NamedToolChoice):
            function = choice.function.name if isinstance(choice, NamedToolChoice) else None
            schema = forced_schema(tools, function)
            return cls(lambda: ForcedReader(names, function), StructuredOutput("json_schema", json.dumps(schema)))
        make = reader_for(template)
        if make is None:
            raise APIError(400, f"deskpod does not know the tool-call format {request.model}'s chat template teaches "
                           "(it reads hermes <tool_call>, mistral [TOOL_CALLS] and Llama 3 JSON)", param="tools")
        special = engine.tokenizer.special_texts()
        return cls(lambda: make(names), None, any(m in special for m in markers(template)))


def _calls(calls: list[Call]) -> list[ToolCall]:
    return [ToolCall(id=call_id(), function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]


def full_response(request: ChatCompletionRequest, request_id: str, choices: list[list[RequestOutput]],
                  plan: ToolPlan = ToolPlan(), prefix: str = "") -> ChatCompletionResponse:
    """The body for each choice's outputs (by index)."""
    out = []
    for index, outputs in enumerate(choices):
        text = prefix + "".join(o.text for o in outputs)
        calls: list[Call] = []
        reasoning = ""
        if plan.reader is not None:
            reader = plan.reader()
            shown, calls = reader.feed(text)
            rest, more = reader.finish()
            text, calls, reasoning = shown + rest, calls + more, reader.take_reasoning()
        if not request.parallel_tool_calls:
            calls = calls[:1]
        logprobs = [t for o in outputs for t in o.logprobs or []] if any(o.logprobs is not None for o in outputs) else None
        message = AssistantMessage(content=None if calls and not text.strip() else text,
                                   reasoning_content=reasoning or None, tool_calls=_calls(calls) or None)
        finish = "tool_calls" if calls else outputs[-1].finish_reason
        out.append(ChatChoice(index=index, message=message, finish_reason=finish,
                              logprobs=chat_logprobs(logprobs, request.return_tokens_as_token_ids)))
    prompt_tokens = choices[0][-1].num_prompt_tokens
    usage = UsageInfo.of(prompt_tokens, sum(c[-1].num_output_tokens for c in choices))
    prompt_logprobs = prompt_logprobs_body(choices[0][0].prompt_logprobs) if request.prompt_logprobs is not None else None
    return ChatCompletionResponse(id=request_id, created=now(), model=request.model, choices=out, usage=usage,
                                  prompt_logprobs=prompt_logprobs)


async def chunks(request: ChatCompletionRequest, request_id: str, outputs_in: AsyncIterator[tuple[int, RequestOutput]],
                 n: int, plan: ToolPlan = ToolPlan(), prefix: str = "") -> AsyncIterator[ChatCompletionChunk]:
    """From (choice index, output) pairs of `n` choices: each choice's role first, then one chunk per output
    that carries text, logprobs or the finish reason (tool calls as they complete); with
    stream_options.include_usage, a last chunk with the usage."""
    created = now()
    readers = [plan.reader() if plan.reader else None for _ in range(n)]
    num_calls, outputs = [0] * n, [0] * n
    prompt_tokens = 0

    def chunk(items: list[ChunkChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=request_id, created=created, model=request.model, choices=items, usage=usage)

    def delta(index: int, text: str, calls: list[Call], reasoning: str = "") -> DeltaMessage:
        if not request.parallel_tool_calls:
            calls = calls[: max(0, 1 - num_calls[index])]
        deltas = [ToolCallDelta(index=num_calls[index] + k, id=call_id(), type="function",
                                function=FunctionCall(name=c.name, arguments=c.arguments)) for k, c in enumerate(calls)]
        num_calls[index] += len(deltas)
        return DeltaMessage(content=text or None, reasoning_content=reasoning or None, tool_calls=deltas or None)

    for index in range(n):
        yield chunk([ChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=prefix))])
    async for index, out in outputs_in:
        prompt_tokens, outputs[index] = out.num_prompt_tokens, out.num_output_tokens
        text, calls, reasoning = out.text, [], ""
        reader = readers[index]
        if reader is not None:
            text, calls = reader.feed(out.text)
            if out.finish_reason is not None:
                rest, more = reader.finish()
                text, calls = text + rest, calls + more
            reasoning = reader.take_reasoning()
        finish = out.finish_reason
        message = delta(index, text, calls, reasoning)
        if finish is not None and num_calls[index]:
            finish = "tool_calls"
        if message.content or message.reasoning_content or message.tool_calls or out.logprobs or finish:
            logprobs = chat_logprobs(out.logprobs, request.return_tokens_as_token_ids)
            yield chunk([ChunkChoice(index=index, delta=message, logprobs=logprobs, finish_reason=finish)])
    if request.include_usage:
        yield chunk([], UsageInfo.of(prompt_tokens, sum(outputs)))


class OpenAIServingChat:
    def __init__(self, models: ModelRegistry, metrics: ServerMetrics):
        self.models = models
        self.metrics = metrics

    async def create(self, request: ChatCompletionRequest) -> Response:
        engine = self.models.llm(request.model)
        plan = ToolPlan.of(request, engine)
        messages = [m.template_dict() for m in request.messages]
        options = dict(add_generation_prompt=request.add_generation_prompt,
                       continue_final_message=request.continue_final_message, template=request.chat_template,
                       add_bos=request.add_special_tokens, limit=engine.max_context,
                       **request.template_kwargs())
        try:  # in a worker thread: a huge prompt must not stall the event loop
            prompt_ids = await asyncio.to_thread(engine.chat_prompt, messages, **options)
        except DeskpodError as e:  # the model's template refused these messages
            raise from_engine_error(e, "messages") from e
        if request.truncate_prompt_tokens:
            prompt_ids = prompt_ids[-request.truncate_prompt_tokens :]
        room = engine.max_context - len(prompt_ids)

        def params(prompt: int, choice: int) -> SamplingParams:
            p = request.sampling_params(room, request.logprobs_count(), plan.structured, choice)
            return replace(p, skip_special_tokens=False) if plan.keep_special else p

        last = request.messages[-1]
        prefix = last.text() if request.echo and last.role == "assistant" else ""
        engine_id = random_id("chatcmpl")  # unique in the engine, whatever id the client asked the reply to carry
        request_id = request.request_id or engine_id
        choices = await Choices.start(engine, [prompt_ids], request.n, params, engine_id,
                                      lambda: self.metrics.timer(request.model), "messages")
        if request.stream:
            events = chunks(request, request_id, choices.stream(), len(choices.generations), plan, prefix)
            return generation_stream(choices, events)
        outputs = await choices.collect()
        return JSONResponse(full_response(request, request_id, outputs, plan, prefix).model_dump(mode="json"))
