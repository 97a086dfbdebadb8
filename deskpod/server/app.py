"""The FastAPI app: models loaded at startup, one router per OpenAI endpoint family, errors, auth, metrics."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from deskpod import __version__
from deskpod.server.api_router import health_router, metrics_router
from deskpod.server.auth import require_api_key
from deskpod.server.config import ServerConfig
from deskpod.server.errors import install_error_handlers
from deskpod.server.metrics import RequestCounter, ServerMetrics
from deskpod.server.openai.chat.api_router import router as chat_router
from deskpod.server.openai.chat.serving import OpenAIServingChat
from deskpod.server.openai.completions.api_router import router as completions_router
from deskpod.server.openai.completions.serving import OpenAIServingCompletion
from deskpod.server.openai.embeddings.api_router import router as embeddings_router
from deskpod.server.openai.embeddings.serving import OpenAIServingEmbedding
from deskpod.server.openai.models.api_router import router as models_router
from deskpod.server.openai.models.serving import OpenAIServingModels
from deskpod.server.registry import ModelRegistry

log = logging.getLogger("deskpod.server")

KEYED_ROUTERS = (models_router, chat_router, completions_router, embeddings_router, metrics_router)


def install(app: FastAPI, registry: ModelRegistry) -> None:
    """Hang the registry, the metrics and one serving object per endpoint family on app.state."""
    metrics = ServerMetrics(registry.llms)
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.serving_models = OpenAIServingModels(registry)
    app.state.serving_chat = OpenAIServingChat(registry, metrics)
    app.state.serving_completion = OpenAIServingCompletion(registry, metrics)
    app.state.serving_embedding = OpenAIServingEmbedding(registry, metrics)


def create_app(config: ServerConfig, registry: ModelRegistry) -> FastAPI:
    """The app serving `registry`'s models (loaded beforehand: a model that cannot load fails the command
    with its own message, not a server that starts and dies); their engines shut down with the app."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("serving %s on http://%s:%d", ", ".join(registry.models), config.host, config.port)
        try:
            yield
        finally:
            await registry.shutdown()

    # no /docs or /openapi.json: they would be the only routes outside the API key
    app = FastAPI(
        title="deskpod", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.api_key = config.api_key
    install(app, registry)
    install_error_handlers(app)
    app.add_middleware(RequestCounter, metrics=app.state.metrics)
    for router in KEYED_ROUTERS:
        app.include_router(router, dependencies=[Depends(require_api_key)])
    app.include_router(health_router)
    return app
