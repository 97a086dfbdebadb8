"""Routes: GET /v1/models, GET /v1/models/{model}."""

from __future__ import annotations

from fastapi import APIRouter, Request

from deskpod.server.errors import error_responses
from deskpod.server.openai.models.protocol import ModelCard, ModelList
from deskpod.server.openai.models.serving import OpenAIServingModels

router = APIRouter()


def serving(raw: Request) -> OpenAIServingModels:
    return raw.app.state.serving_models


@router.get("/v1/models", responses=error_responses(401))
async def list_models(raw: Request) -> ModelList:
    return serving(raw).list()


@router.get("/v1/models/{model:path}", responses=error_responses(401, 404))
async def retrieve_model(model: str, raw: Request) -> ModelCard:
    return serving(raw).retrieve(model)
