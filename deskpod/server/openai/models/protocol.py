"""/v1/models: the list of served models (OpenAI's shapes, plus the context length as vLLM reports it)."""

from __future__ import annotations

from typing import Literal

from deskpod.server.openai.protocol import OpenAIModel


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "deskpod"
    max_model_len: int


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
