"""Route: POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from deskpod.server.openai.chat.protocol import ChatCompletionRequest
from deskpod.server.openai.chat.serving import OpenAIServingChat
from deskpod.server.openai.generation import cancel_on_disconnect

router = APIRouter()


def serving(raw: Request) -> OpenAIServingChat:
    return raw.app.state.serving_chat


@router.post("/v1/chat/completions")
async def create_chat_completion(request: ChatCompletionRequest, raw: Request) -> Response:
    return await cancel_on_disconnect(raw, lambda: serving(raw).create(request))
