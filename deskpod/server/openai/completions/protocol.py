"""/v1/completions: the request, the response, the stream's chunks (OpenAI's legacy completions shapes)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator

from deskpod.server.openai.protocol import MAX_TOP_LOGPROBS, OpenAIModel, SamplingRequest, UsageInfo

MAX_PROMPTS = 64  # prompts in one request: each (times n) is a request in the engine


class CompletionRequest(SamplingRequest):
    ROUTE: ClassVar[str] = "/v1/completions"

    # one prompt (text or token ids) or a list of them
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool = False  # the reply starts with the prompt (and its logprobs, with logprobs)
    add_special_tokens: bool = True  # a text prompt gets the BOS the model asks for

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, prompt: object) -> object:
        def ids(x: object) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(prompt, str) or ids(prompt):
            return prompt
        if isinstance(prompt, list) and (all(isinstance(p, str) for p in prompt) or all(ids(p) for p in prompt)):
            return prompt
        raise ValueError("a prompt is a string or a list of token ids; several are a list of strings or a list of "
                         "lists of token ids (not mixed)")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, prompt: str | list) -> str | list:
        prompts = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else [prompt]
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request")
        if any(not p for p in prompts):
            raise ValueError("a prompt is empty")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        """Each prompt as validated: a text or a list of token ids."""
        many = isinstance(self.prompt, list) and isinstance(self.prompt[0], (str, list))
        return list(self.prompt) if many else [self.prompt]  # type: ignore[list-item]


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
    prompt_logprobs: list[dict | None] | None = None  # vLLM's, with prompt_logprobs: k


class CompletionResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
