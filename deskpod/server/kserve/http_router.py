"""The v2 HTTP routes: thin adapters from a request to one KServeServing call and back.

Bodies are read as bytes and parsed here, with or without a Content-Type header (Triton's clients often
send none), and refused with 413 beyond the server's size limit: first from Content-Length, then while
reading, for bodies that do not declare it. Every failure is Triton's {"error": "..."} with its status.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Coroutine
from typing import Any

from deskpod.server.api_router import link_problems
from deskpod.server.kserve.shared_memory import CUDA_REFUSAL
from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from deskpod.errors import InvalidRequest
from deskpod.server.auth import require_api_key
from deskpod.server.kserve import http_codec
from deskpod.server.kserve.errors import RequestTooLarge, error_response
from deskpod.server.kserve.serving import KServeServing


class TritonRoute(APIRoute):
    """A route whose every error, the API key's included, leaves as {"error": "..."}."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as e:
                return error_response(e)

        return run


health_router = APIRouter(route_class=TritonRoute)  # no API key: probes must reach it
router = APIRouter(route_class=TritonRoute)


def serving(raw: Request) -> KServeServing:
    return raw.app.state.kserve


async def read_body(raw: Request) -> bytes:
    limit = serving(raw).limits.max_request_bytes
    declared = raw.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(_too_large(int(declared), limit))
    chunks, size = [], 0
    async for chunk in raw.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(_too_large(size, limit))
        chunks.append(chunk)
    return decompress(b"".join(chunks), raw.headers.get("content-encoding"), limit)


# Content-Encoding -> zlib's wbits for it (tritonclient's request_compression_algorithm)
ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body as sent before compression, held to the same size limit once inflated."""
    if encoding is None or encoding.strip().lower() in ("", "identity"):
        return body
    wbits = ENCODINGS.get(encoding.strip().lower())
    if wbits is None:
        raise InvalidRequest(f"Content-Encoding {encoding!r} is not supported: send gzip, deflate or none")
    inflate = zlib.decompressobj(wbits)
    try:
        data = inflate.decompress(body, limit + 1)
    except zlib.error as e:
        raise InvalidRequest(f"the body is not valid {encoding} data: {e}") from None
    if len(data) > limit:
        raise RequestTooLarge(_too_large(len(data), limit))
    return data


def _too_large(size: int, limit: int) -> str:
    return (
        f"the request body is over the server's limit of {limit / 2**20:g} MB ({size} bytes or more):"
        " send smaller batches, or start the server with a larger --max-request-mb"
    )


async def read_json(raw: Request, default: dict | None = None) -> dict:
    """The body as a JSON object whatever its Content-Type; an empty body is `default` where allowed."""
    body = await read_body(raw)
    if not body.strip() and default is not None:
        return default
    return http_codec.parse_json_header(body)


def empty() -> Response:
    return Response(status_code=200)


# --- health and server ---------------------------------------------------------------------------


@health_router.get("/v2/health/live")
async def live() -> Response:
    return empty()


@health_router.get("/v2/health/ready")
async def ready(raw: Request) -> Response:
    # answered only once every model was tried: uvicorn listens after startup; a linked model missing a box
    # cannot serve until it joins again
    degraded = link_problems(raw)
    return JSONResponse({"error": f"linked models degraded: {degraded}"}, 503) if degraded else empty()


@router.get("/v2")
async def server_metadata(raw: Request) -> dict:
    return serving(raw).server_metadata()


# --- models (the fixed /v2/models/stats before /v2/models/{model}) -------------------------------


@router.get("/v2/models/stats")
async def all_statistics(raw: Request) -> dict:
    return {"model_stats": serving(raw).statistics()}


@router.get("/v2/models/{model}")
@router.get("/v2/models/{model}/versions/{version}")
async def model_metadata(model: str, raw: Request, version: str = "") -> dict:
    return serving(raw).model_metadata(model, version)


@router.get("/v2/models/{model}/ready")
@router.get("/v2/models/{model}/versions/{version}/ready")
async def model_ready(model: str, raw: Request, version: str = "") -> Response:
    kserve = serving(raw)
    if not kserve.model_ready(model, version):
        return JSONResponse({"error": kserve.why_not_ready(model, version)}, 503)
    return empty()


@router.get("/v2/models/{model}/config")
@router.get("/v2/models/{model}/versions/{version}/config")
async def model_config(model: str, raw: Request, version: str = "") -> dict:
    return serving(raw).config_dict(model, version)


@router.get("/v2/models/{model}/stats")
@router.get("/v2/models/{model}/versions/{version}/stats")
async def model_statistics(model: str, raw: Request, version: str = "") -> dict:
    return {"model_stats": serving(raw).statistics(model, version)}


async def infer(raw: Request) -> Response:
    """POST .../infer, the hot path: a plain Starlette endpoint (FastAPI's per-request dependency solving
    costs more than the rest of the request), so it checks the API key itself."""
    try:
        await require_api_key(raw)
        model, version = raw.path_params["model"], raw.path_params.get("version", "")
        kserve = serving(raw)
        kserve.require(model, version)
        body = await read_body(raw)
        request, fmt = http_codec.decode_request(body, raw.headers.get(http_codec.HEADER_LENGTH), model, version,
                                                 kserve.shared_memory)
        response = await kserve.infer(request)
        content, header_length = http_codec.encode_response(response, fmt, kserve.shared_memory)
    except Exception as e:
        return error_response(e)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content, media_type="application/octet-stream", headers={http_codec.HEADER_LENGTH: str(header_length)}
    )


class NamedRoute(Route):
    """A Starlette route that names itself in the scope, as FastAPI's do (the request metrics label by it)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self
        await super().handle(scope, receive, send)


# matched before every other route (app.py puts them first), keyed by `infer` itself
FAST_ROUTES = [
    NamedRoute("/v2/models/{model}/infer", infer, methods=["POST"]),
    NamedRoute("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
]


# --- repository ----------------------------------------------------------------------------------


@router.post("/v2/repository/index")
async def repository_index(raw: Request) -> list[dict]:
    options = await read_json(raw, default={})
    return serving(raw).index(ready_only=bool(options.get("ready", False)))


@router.post("/v2/repository/models/{model}/load")
async def repository_load(model: str, raw: Request) -> Response:
    options = await read_json(raw, default={})
    parameters = options.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidRequest("`parameters` must be a JSON object")
    config = parameters.get("config")
    if config is not None and not isinstance(config, str):
        raise InvalidRequest("parameters.config must be the model configuration as a JSON string")
    await serving(raw).load(model, config)
    return empty()


@router.post("/v2/repository/models/{model}/unload")
async def repository_unload(model: str, raw: Request) -> Response:
    await read_json(raw, default={})
    await serving(raw).unload(model)
    return empty()


# --- system shared memory (CUDA shared memory is refused: no GPU here) ------------------------------


@router.get("/v2/systemsharedmemory/status")
@router.get("/v2/systemsharedmemory/region/{region}/status")
async def shm_status(raw: Request, region: str = "") -> list[dict]:
    return serving(raw).shared_memory.status(region or None)


@router.post("/v2/systemsharedmemory/region/{region}/register")
async def shm_register(region: str, raw: Request) -> Response:
    body = await read_json(raw, default={})
    if not isinstance(body, dict) or "key" not in body or "byte_size" not in body:
        raise InvalidRequest("register a region with {\"key\": \"/shm_key\", \"offset\": 0, \"byte_size\": N}")
    serving(raw).shared_memory.register(region, body["key"], body.get("offset", 0), body["byte_size"])
    return empty()


@router.post("/v2/systemsharedmemory/unregister")
@router.post("/v2/systemsharedmemory/region/{region}/unregister")
async def shm_unregister(raw: Request, region: str = "") -> Response:
    await read_json(raw, default={})
    serving(raw).shared_memory.unregister(region or None)
    return empty()


@router.get("/v2/cudasharedmemory/status")
@router.get("/v2/cudasharedmemory/region/{region}/status")
@router.post("/v2/cudasharedmemory/region/{region}/register")
@router.post("/v2/cudasharedmemory/unregister")
@router.post("/v2/cudasharedmemory/region/{region}/unregister")
async def cuda_shm(raw: Request, region: str = "") -> Response:
    raise InvalidRequest(CUDA_REFUSAL)

