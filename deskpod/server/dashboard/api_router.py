"""The dashboard's routes: the page and its assets (no key: they hold no data; the page asks for the key), and
/api/dashboard/* (with the key, like the API). Everything else the page shows comes from the API's own routes:
/v1/models, /v1/chat/completions, /metrics, /v2/repository/*."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, Field

from deskpod.server.dashboard.serving import DashboardServing
from deskpod.server.errors import APIError

STATIC = Path(__file__).parent / "static"
ASSETS = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}

page_router = APIRouter(include_in_schema=False)
router = APIRouter(prefix="/api/dashboard", tags=["dashboard"])


@page_router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=_PAGE_HEADERS)


@page_router.get("/dashboard/{asset}")
async def asset(asset: str) -> FileResponse:
    if asset not in ASSETS:  # a fixed set: no path from the request reaches the file system
        raise APIError(404, f"no dashboard asset {asset!r}")
    return FileResponse(STATIC / asset, media_type=ASSETS[asset], headers=_PAGE_HEADERS)


# The page runs only its own scripts, talks only to this server, and is never framed by another site.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def _serving(request: Request) -> DashboardServing:
    return request.app.state.dashboard


class PullRequest(BaseModel):
    name: str = Field(description="a catalog model's name")


class PlanRequest(BaseModel):
    model: str = Field(description="a store model, a built-in name or a size such as 70b")
    hardware: list[str] = Field(default=["digits"], min_length=1, max_length=8)
    precision: str | None = None
    context: int | None = Field(default=None, ge=2)


@router.get("/box")
def box(request: Request) -> dict:  # plain defs: FastAPI runs them off the event loop
    return _serving(request).box()


@router.get("/models")
def models(request: Request) -> dict:
    return _serving(request).models()


@router.post("/plan")
def plan(body: PlanRequest, request: Request) -> list[dict]:
    return _serving(request).plan(body.model, body.hardware, body.precision, body.context)


@router.post("/store/pull")
async def pull(body: PullRequest, request: Request) -> StreamingResponse:
    """Server-sent events: progress, then the model's manifest or the error."""
    _serving(request).check_pullable(body.name)  # a 400 before the stream starts
    events = (f"data: {json.dumps(event)}\n\n" async for event in _serving(request).pull(body.name))
    return StreamingResponse(events, media_type="text/event-stream")


@router.delete("/store/{name:path}")
def remove(name: str, request: Request) -> dict:  # may wait on a pull's lock
    _serving(request).remove(name)
    return {"removed": name}


@router.post("/store/{name:path}/verify")
def verify(name: str, request: Request) -> dict:  # hashes every blob
    return {"name": name, "problems": _serving(request).verify(name)}
