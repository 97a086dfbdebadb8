"""/v1/embeddings over deskpod.embed: texts -> vectors, in a worker thread so the event loop stays free."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence

import numpy as np

from deskpod.embed.embedder import Embedding
from deskpod.server.errors import APIError
from deskpod.server.metrics import ServerMetrics
from deskpod.server.openai.embeddings.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from deskpod.server.registry import ModelRegistry


def encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # what the official client asks for by default
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return vector


def response(request: EmbeddingRequest, embeddings: Sequence[Embedding]) -> EmbeddingResponse:
    data = [
        EmbeddingData(index=i, embedding=encode(e.vector, request.encoding_format)) for i, e in enumerate(embeddings)
    ]
    tokens = sum(e.num_tokens for e in embeddings)
    return EmbeddingResponse(
        data=data, model=request.model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    )


class OpenAIServingEmbedding:
    def __init__(self, models: ModelRegistry, metrics: ServerMetrics):
        self.models = models
        self.metrics = metrics

    async def create(self, request: EmbeddingRequest) -> EmbeddingResponse:
        embedder = self.models.embedder(request.model)
        if request.dimensions is not None and request.dimensions != embedder.dim:
            raise APIError(
                400,
                f"dimensions: {request.model} makes {embedder.dim}-dimensional vectors only",
                param="dimensions",
                code="invalid_value",
            )
        embeddings = await asyncio.to_thread(embedder.embed, request.texts())
        self.metrics.embedding_tokens.labels(request.model).inc(sum(e.num_tokens for e in embeddings))
        return response(request, embeddings)
