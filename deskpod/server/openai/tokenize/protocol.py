"""POST /tokenize and /detokenize (vLLM's routes): a prompt or a conversation to the ids the model would see,
and ids back to text."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from deskpod.server.openai.chat.protocol import ChatMessage, Tool
from deskpod.server.openai.protocol import OpenAIModel


class TokenizeRequest(OpenAIModel):
    """Either `prompt` (as /v1/completions tokenizes it) or `messages` (as /v1/chat/completions renders them)."""

    model: str
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = None  # prompt: the model's BOS (default yes); messages: one more (default no)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    return_token_strs: bool = False


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIModel):
    model: str
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(OpenAIModel):
    prompt: str
