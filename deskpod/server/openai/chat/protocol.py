"""/v1/chat/completions: the request, the response, the stream's chunks (OpenAI's shapes)."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from deskpod.server.openai.fields import FieldError
from deskpod.server.openai.protocol import MAX_TOP_LOGPROBS, OpenAIModel, SamplingRequest, UsageInfo


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class FunctionCall(OpenAIModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"a {kind!r} content part: deskpod's language models read text parts only")
        return content

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])

    def template_dict(self) -> dict:
        """The message as chat templates read it (transformers' convention): "developer" as "system", the
        calls' arguments as objects, not JSON text."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                for c in self.tool_calls
            ]
        return message


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # a template may still render it; the model sees what the client sent


class FunctionDefinition(OpenAIModel):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.\-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    ROUTE: ClassVar[str] = "/v1/chat/completions"

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # how the conversation becomes a prompt (vLLM's fields)
    echo: bool = False  # the reply starts with the last message's text when that message is the assistant's
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # the model's BOS before the rendered prompt: None as llama.cpp (when the model asks for one and the
    # template did not write it), True whenever the template did not write it, False never
    add_special_tokens: bool | None = None
    chat_template: str | None = None  # rendered in the same sandbox as the model's own
    chat_template_kwargs: dict[str, Any] | None = None
    # how long a reasoning model thinks: given to a chat template that reads it (gpt-oss's "Reasoning: high")
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, tools: list[Tool] | None) -> list[Tool] | None:
        names = [t.function.name for t in tools or []]
        if len(set(names)) != len(names):
            raise ValueError("two tools have the same name")
        return tools

    @model_validator(mode="after")
    def _coherent_prompt(self) -> ChatCompletionRequest:
        if self.continue_final_message and self.add_generation_prompt:
            raise FieldError("continue_final_message", "it continues the last message: send add_generation_prompt: false")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise FieldError("continue_final_message", "the last message must be the assistant's, to be continued")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in self.tools or []}:
            raise FieldError("tool_choice", f"it names {choice.function.name!r}, which is not in tools")
        if choice == "required" or isinstance(choice, NamedToolChoice):
            if not self.tools:
                raise FieldError("tool_choice", "it asks for a tool call but tools is empty")
            if self.structured() is not None:
                raise FieldError("tool_choice", "a required or named tool call constrains the output, as does the "
                                 "structured output: send one of them")
        return self

    @property
    def calls_tools(self) -> bool:
        """Tools are offered to the model (rendered in the prompt, its calls parsed from the reply)."""
        return bool(self.tools) and self.tool_choice != "none"

    def logprobs_count(self) -> int | None:
        """SamplingParams.logprobs: None for none, else how many alternatives besides the chosen token."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_kwargs(self) -> dict[str, Any]:
        extra = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            extra.setdefault("reasoning_effort", self.reasoning_effort)
        if self.calls_tools:
            extra["tools"] = [t.model_dump(exclude_none=True) for t in self.tools or []]
        return extra


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(OpenAIModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None  # a reasoning model's thinking, apart from its answer (vLLM's field)
    tool_calls: list[ToolCall] | None = None


class ChatChoice(OpenAIModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict | None] | None = None  # vLLM's, with prompt_logprobs: k


class ToolCallDelta(OpenAIModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall | None = None


class DeltaMessage(OpenAIModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(OpenAIModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageInfo | None = None
