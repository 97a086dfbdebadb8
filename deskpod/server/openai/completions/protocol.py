"""/v1/completions: the request, the response, the stream's chunks (OpenAI's legacy completions shapes)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from deskpod.server.openai.protocol import OpenAIModel, SamplingRequest, UsageInfo

MAX_LOGPROBS = 20


class CompletionRequest(SamplingRequest):
    # one prompt: text or token ids (a list holding exactly one of them is accepted too)
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list) -> str | list:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError("send one prompt per request (a list of several prompts is not supported)")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("the prompt is empty")
        return prompt

    def single_prompt(self) -> str | list[int]:
        """The prompt as validated: one text or one list of token ids."""
        return self.prompt  # type: ignore[return-value]  # _one_prompt unwrapped any one-item list


class CompletionLogprobs(OpenAIModel):
    text_offset: list[int] = []
    token_logprobs: list[float | None] = []
    tokens: list[str] = []
    top_logprobs: list[dict[str, float] | None] = []


class CompletionChoice(OpenAIModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
