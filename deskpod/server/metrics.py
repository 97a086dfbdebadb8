"""Prometheus metrics: what the server observes per request, and the engines' own state read at scrape time.

deskpod_requests_total{route,status}            HTTP requests answered
deskpod_time_to_first_token_seconds{model}      histogram, from arrival in the engine to the first token
deskpod_inter_token_latency_seconds{model}      histogram, between successive tokens of one request
deskpod_e2e_request_latency_seconds{model}      histogram, arrival to last token
deskpod_requests_aborted_total{model}           requests cancelled before they finished (client gone)
deskpod_prompt_tokens_total{model}              from the engine's counters, like everything below
deskpod_generation_tokens_total{model}
deskpod_num_requests_waiting{model}             queue depth
deskpod_num_requests_running{model}
deskpod_kv_cache_usage_ratio{model}             0..1, blocks held by live requests
deskpod_kv_cache_blocks_total{model} / deskpod_kv_cache_blocks_free{model}
deskpod_num_preemptions_total{model}
deskpod_embedding_input_tokens_total{model}

With a model repository, Triton's nv_inference_* series too (deskpod.server.kserve.metrics.TritonCollector,
registered in the same registry by the app).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from deskpod.engine.async_engine import AsyncLLM, RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)

# engine stat -> (metric name, help, counter?)
ENGINE_STATS = {
    "num_waiting": ("deskpod_num_requests_waiting", "Requests waiting in the engine's queue", False),
    "num_running": ("deskpod_num_requests_running", "Requests running in the engine", False),
    "kv_usage": ("deskpod_kv_cache_usage_ratio", "Fraction of KV-cache blocks held by live requests", False),
    "kv_blocks_total": ("deskpod_kv_cache_blocks_total", "KV-cache blocks in the pool", False),
    "kv_blocks_free": ("deskpod_kv_cache_blocks_free", "KV-cache blocks free (cached prefixes included)", False),
    "num_preemptions": ("deskpod_num_preemptions", "Requests preempted for want of KV blocks", True),
    "prompt_tokens_total": ("deskpod_prompt_tokens", "Prompt tokens admitted", True),
    "generation_tokens_total": ("deskpod_generation_tokens", "Tokens generated", True),
}


class EngineCollector(Collector):
    """Reads `engine.stats()` of every LLM when Prometheus scrapes, so the numbers are never stale."""

    def __init__(self, engines: Callable[[], Iterable[tuple[str, AsyncLLM]]]):
        self.engines = engines

    def collect(self) -> Iterator[Metric]:
        families = {
            stat: (CounterMetricFamily if counter else GaugeMetricFamily)(name, doc, labels=["model"])
            for stat, (name, doc, counter) in ENGINE_STATS.items()
        }
        for model, engine in self.engines():
            stats = engine.stats()
            for stat, family in families.items():
                family.add_metric([model], float(getattr(stats, stat)))
        yield from families.values()


class ServerMetrics:
    def __init__(self, engines: Callable[[], Iterable[tuple[str, AsyncLLM]]]):
        self.registry = CollectorRegistry()  # one per app: several servers can live in one process
        r = self.registry
        self.requests = Counter("deskpod_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.ttft = Histogram(
            "deskpod_time_to_first_token_seconds", "Time to first token", ["model"], buckets=TTFT_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "deskpod_inter_token_latency_seconds", "Time between tokens", ["model"], buckets=ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "deskpod_e2e_request_latency_seconds", "Arrival to last token", ["model"], buckets=E2E_BUCKETS, registry=r
        )
        self.aborted = Counter(
            "deskpod_requests_aborted", "Requests cancelled before they finished", ["model"], registry=r
        )
        self.embedding_tokens = Counter("deskpod_embedding_input_tokens", "Tokens embedded", ["model"], registry=r)
        r.register(EngineCollector(engines))

    def timer(self, model: str) -> RequestTimer:
        return RequestTimer(self, model)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Observes one generation's latencies from its outputs (the engine's clock is time.monotonic)."""

    def __init__(self, metrics: ServerMetrics, model: str):
        self.m, self.model = metrics, model
        self.last: float | None = None

    def output(self, out: RequestOutput) -> None:
        now = time.monotonic()
        if self.last is None:  # the first output: its first token (perhaps an end-of-sequence one) is sampled
            self.m.ttft.labels(self.model).observe(max((out.first_token_time or now) - out.arrival_time, 0.0))
        elif out.token_ids:
            gap = (now - self.last) / len(out.token_ids)
            for _ in out.token_ids:
                self.m.itl.labels(self.model).observe(gap)
        self.last = now
        if out.finish_reason is not None:
            self.m.e2e.labels(self.model).observe(max(now - out.arrival_time, 0.0))

    def aborted(self) -> None:
        self.m.aborted.labels(self.model).inc()


class RequestCounter:
    """ASGI middleware: counts every answered request by its route template (not its raw path, so that
    unknown paths cannot blow up the label set) and status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status: dict[str, Any] = {"code": 500}

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status["code"])).inc()
