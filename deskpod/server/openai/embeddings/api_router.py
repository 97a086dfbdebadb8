"""Route: POST /v1/embeddings."""

from __future__ import annotations

from fastapi import APIRouter, Request

from deskpod.server.errors import error_responses
from deskpod.server.openai.embeddings.protocol import EmbeddingRequest, EmbeddingResponse
from deskpod.server.openai.embeddings.serving import OpenAIServingEmbedding

router = APIRouter()


def serving(raw: Request) -> OpenAIServingEmbedding:
    return raw.app.state.serving_embedding


@router.post("/v1/embeddings", responses=error_responses(400, 401, 404, 413, 429))
async def create_embedding(request: EmbeddingRequest, raw: Request) -> EmbeddingResponse:
    return await serving(raw).create(request)
