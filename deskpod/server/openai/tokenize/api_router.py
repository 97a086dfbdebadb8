"""Routes: POST /tokenize, POST /detokenize (vLLM's)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from deskpod.server.errors import error_responses
from deskpod.server.openai.tokenize.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from deskpod.server.openai.tokenize.serving import OpenAIServingTokenization

router = APIRouter()


def serving(raw: Request) -> OpenAIServingTokenization:
    return raw.app.state.serving_tokenization


@router.post("/tokenize", responses=error_responses(400, 401, 404, 413))
async def tokenize(request: TokenizeRequest, raw: Request) -> TokenizeResponse:
    return await serving(raw).tokenize(request)


@router.post("/detokenize", responses=error_responses(400, 401, 404, 413))
async def detokenize(request: DetokenizeRequest, raw: Request) -> DetokenizeResponse:
    return await serving(raw).detokenize(request)
