"""Route: POST /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from deskpod.server.openai.completions.protocol import CompletionRequest
from deskpod.server.openai.completions.serving import OpenAIServingCompletion
from deskpod.server.openai.generation import cancel_on_disconnect

router = APIRouter()


def serving(raw: Request) -> OpenAIServingCompletion:
    return raw.app.state.serving_completion


@router.post("/v1/completions")
async def create_completion(request: CompletionRequest, raw: Request) -> Response:
    return await cancel_on_disconnect(raw, lambda: serving(raw).create(request))
