"""/v1/embeddings: the request and the response (OpenAI's shapes)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from deskpod.server.openai.protocol import OpenAIModel

MAX_INPUTS = 2048


class EmbeddingRequest(OpenAIModel):
    model: str
    input: str | Annotated[list[str], Field(min_length=1, max_length=MAX_INPUTS)] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _text_only(cls, value: str | list) -> str | list:
        if value == []:
            raise ValueError("give at least one text")
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise ValueError("token-id input is not supported: send the text (a string or a list of strings)")
        return value

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)  # type: ignore[arg-type]


class EmbeddingData(OpenAIModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # a base64 string of little-endian float32 with encoding_format "base64"


class EmbeddingUsage(OpenAIModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
