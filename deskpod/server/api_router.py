"""The server's own routes: GET /health (no key needed) and GET /metrics (Prometheus text format)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from starlette.responses import Response

from deskpod.server.metrics import CONTENT_TYPE, ServerMetrics

health_router = APIRouter()
metrics_router = APIRouter()


@health_router.get("/health")
async def health() -> dict:
    return {"status": "ok"}  # answered only once the models are loaded: uvicorn listens after startup


@metrics_router.get("/metrics")
async def metrics(raw: Request) -> Response:
    served: ServerMetrics = raw.app.state.metrics
    # in a worker thread: reading the engines' stats waits for their current step to end
    return Response(await asyncio.to_thread(served.render), media_type=CONTENT_TYPE)
