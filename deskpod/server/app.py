"""The FastAPI app: models loaded at startup, one router per OpenAI endpoint family, the KServe v2 routes
(and their gRPC twin, started on the same event loop), errors, auth, metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from deskpod import __version__
from deskpod.server.api_router import health_router, metrics_router
from deskpod.server.auth import require_api_key
from deskpod.server.config import ServerConfig, is_loopback
from deskpod.server.dashboard.api_router import page_router as dashboard_page_router
from deskpod.server.dashboard.api_router import router as dashboard_router
from deskpod.server.dashboard.serving import DashboardServing
from deskpod.server.docs import API_DESCRIPTION, install_docs
from deskpod.server.errors import install_error_handlers
from deskpod.server.kserve import generate as kserve_generate
from deskpod.server.kserve import http_router as kserve_http
from deskpod.server.kserve.grpc_service import start_grpc_server
from deskpod.server.kserve.llm import LLMModels
from deskpod.server.kserve.metrics import TritonCollector
from deskpod.server.kserve.serving import KServeServing, Limits
from deskpod.server.metrics import RequestCounter, ServerMetrics
from deskpod.server.middleware import BodyLimit, CrossSiteGuard, RequestId
from deskpod.server.openai.chat.api_router import router as chat_router
from deskpod.server.openai.chat.serving import OpenAIServingChat
from deskpod.server.openai.completions.api_router import router as completions_router
from deskpod.server.openai.completions.serving import OpenAIServingCompletion
from deskpod.server.openai.embeddings.api_router import router as embeddings_router
from deskpod.server.openai.embeddings.serving import OpenAIServingEmbedding
from deskpod.server.openai.models.api_router import router as models_router
from deskpod.server.openai.models.serving import OpenAIServingModels
from deskpod.server.openai.tokenize.api_router import router as tokenize_router
from deskpod.server.openai.tokenize.serving import OpenAIServingTokenization
from deskpod.server.registry import ModelRegistry

if TYPE_CHECKING:
    from deskpod.backends.repository import ModelRepository

log = logging.getLogger("deskpod.server")

KEYED_ROUTERS = (
    models_router,
    chat_router,
    completions_router,
    embeddings_router,
    tokenize_router,
    metrics_router,
    kserve_http.router,
    kserve_generate.router,
    dashboard_router,
)
# probes, and the dashboard's page (it holds no data; it asks for the key)
OPEN_ROUTERS = (health_router, kserve_http.health_router, dashboard_page_router)
GRPC_GRACE_S = 5


def install(
    app: FastAPI, registry: ModelRegistry, repository: ModelRepository | None = None, limits: Limits | None = None,
    model_control_mode: str | None = None,
) -> None:
    """Hang the registry, the repository, the metrics and one serving object per endpoint family on app.state."""
    metrics = ServerMetrics(registry.llms)
    if repository is not None:
        from deskpod.backends import custom_metrics

        metrics.registry.register(TritonCollector(repository.statistics))
        metrics.extra.append(custom_metrics.exposition)  # Python models' pb_utils.MetricFamily series
    app.state.registry = registry
    app.state.repository = repository
    app.state.metrics = metrics
    app.state.serving_models = OpenAIServingModels(registry)
    app.state.serving_chat = OpenAIServingChat(registry, metrics)
    app.state.serving_completion = OpenAIServingCompletion(registry, metrics)
    app.state.serving_embedding = OpenAIServingEmbedding(registry, metrics)
    app.state.serving_tokenization = OpenAIServingTokenization(registry)
    app.state.kserve = KServeServing(repository, LLMModels(registry, metrics), limits or Limits(), model_control_mode)
    app.state.dashboard = DashboardServing(registry, repository)


def start_metrics_server(main: FastAPI, host: str, port: int):
    """/metrics alone on its own port (Triton's 8002), behind the same key, on a thread of its own (so its
    server installs no signal handlers of its own)."""
    import threading

    import uvicorn

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.state.api_key, app.state.metrics = main.state.api_key, main.state.metrics
    app.include_router(metrics_router, dependencies=[Depends(require_api_key)])
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    threading.Thread(target=server.run, name="deskpod-metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics", host, port)
    return server


def create_app(config: ServerConfig, registry: ModelRegistry, repository: ModelRepository | None = None) -> FastAPI:
    """The app serving `registry`'s models and `repository`'s (both loaded beforehand: a store model that
    cannot load fails the command with its own message, not a server that starts and dies). With
    `config.grpc_port`, the v2 gRPC server runs on the app's event loop for the app's lifetime; engines and
    repository shut down with the app."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        served = dict.fromkeys([*registry.models, *(m["name"] for m in app.state.kserve.index())])  # ordered, once
        log.info("serving %s on http://%s:%d", ", ".join(served) or "no models", config.host, config.port)
        grpc_server = poller = None
        if repository is not None and config.model_control_mode == "poll":
            from deskpod.backends.control import RepositoryPoller

            poller = RepositoryPoller(repository, config.repository_poll_secs).start()
        metrics_server = start_metrics_server(app, config.host, config.metrics_port) if config.metrics_port else None
        if config.grpc_port is not None:
            grpc_server = await start_grpc_server(app.state.kserve, config.host, config.grpc_port, config.api_key)
            log.info("KServe v2 gRPC on %s:%d", config.host, config.grpc_port)
        try:
            yield
        finally:
            if poller is not None:
                await asyncio.to_thread(poller.stop)
            if metrics_server is not None:
                metrics_server.should_exit = True
            if grpc_server is not None:
                await grpc_server.stop(GRPC_GRACE_S)
            await registry.shutdown()
            if repository is not None:
                await asyncio.to_thread(repository.close)

    # /openapi.json and /docs need no key, like /health: they describe deskpod's API, not the models or data
    app = FastAPI(title="deskpod", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", description=API_DESCRIPTION)
    app.state.api_key = config.api_key
    install(app, registry, repository, Limits(config.max_request_bytes), config.model_control_mode)
    install_error_handlers(app)
    install_docs(app)
    app.add_middleware(BodyLimit, max_bytes=config.max_request_bytes)
    app.add_middleware(RequestCounter, metrics=app.state.metrics)
    app.add_middleware(CrossSiteGuard, allowed_origins=config.allowed_origins,
                       loopback_only=is_loopback(config.host))
    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["x-request-id"])
    app.add_middleware(RequestId)
    for router in KEYED_ROUTERS:
        app.include_router(router, dependencies=[Depends(require_api_key)])
    for router in OPEN_ROUTERS:
        app.include_router(router)
    app.router.routes[:0] = kserve_http.FAST_ROUTES
    return app
