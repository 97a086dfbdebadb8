"""Routes: GET /v1/models, GET /v1/models/{model}."""

from __future__ import annotations

from fastapi import APIRouter, Request

from deskpod.server.openai.models.protocol import ModelCard, ModelList
from deskpod.server.openai.models.serving import OpenAIServingModels

router = APIRouter()


def serving(raw: Request) -> OpenAIServingModels:
    return raw.app.state.serving_models


@router.get("/v1/models")
async def list_models(raw: Request) -> ModelList:
    return serving(raw).list()


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, raw: Request) -> ModelCard:
    return serving(raw).retrieve(model)
