"""The server's own routes: GET /health (no key needed) and GET /metrics (Prometheus text format)."""

from __future__ import annotations

import asyncio

from dataclasses import asdict

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from deskpod.server.metrics import CONTENT_TYPE, ServerMetrics

health_router = APIRouter()
metrics_router = APIRouter()


@health_router.get("/health")
async def health(raw: Request) -> Response:
    # answered only once the models are loaded: uvicorn listens after startup
    degraded = link_problems(raw)
    if degraded:
        return JSONResponse({"status": "degraded", "links": degraded}, 503)
    return JSONResponse({"status": "ok"})


def link_problems(raw: Request) -> dict[str, dict]:
    """The linked models whose link is not whole, by name, with which box is missing and why."""
    registry = getattr(raw.app.state, "registry", None)
    links = ((name, engine.link.status()) for name, engine in (registry.llms() if registry else ()) if engine.link)
    return {name: asdict(status) for name, status in links if status.state != "ok"}


@metrics_router.get("/metrics")
async def metrics(raw: Request) -> Response:
    served: ServerMetrics = raw.app.state.metrics
    # in a worker thread: reading the engines' stats waits for their current step to end
    return Response(await asyncio.to_thread(served.render), media_type=CONTENT_TYPE)
