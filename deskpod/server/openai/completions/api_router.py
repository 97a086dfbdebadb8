"""Route: POST /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from deskpod.server.docs import sse_events
from deskpod.server.errors import error_responses
from deskpod.server.openai.completions.protocol import CompletionRequest, CompletionResponse
from deskpod.server.openai.completions.serving import OpenAIServingCompletion
from deskpod.server.openai.generation import cancel_on_disconnect

router = APIRouter()
GENERATION_RESPONSES: dict[int | str, dict] = {
    200: {"model": CompletionResponse, "description": "The reply; with `stream: true`, server-sent events of chunks",
          "content": {"text/event-stream": {"schema": sse_events("CompletionResponse")}}},
    **error_responses(400, 401, 404, 413, 429),
}


def serving(raw: Request) -> OpenAIServingCompletion:
    return raw.app.state.serving_completion


@router.post("/v1/completions", response_model=None, responses=GENERATION_RESPONSES)
async def create_completion(request: CompletionRequest, raw: Request) -> Response:
    return await cancel_on_disconnect(raw, lambda: serving(raw).create(request))
