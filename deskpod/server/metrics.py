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
deskpod_spec_decode_num_draft_tokens_total{model}     speculative decoding: tokens guessed,
deskpod_spec_decode_num_accepted_tokens_total{model}  and of them those the model confirmed
deskpod_embedding_input_tokens_total{model}
deskpod_link_node_up{model,node,address,role}   a linked model: each box serving (1) or not; its weight bytes,
deskpod_link_wait_seconds_total{model,kind}     and the seconds steps waited on the link (exchange, handoff)

The same figures under vLLM's names too, labelled `model_name`, so that a dashboard made for vLLM reads
deskpod: vllm:num_requests_running / _waiting, vllm:kv_cache_usage_perc (and its older name
vllm:gpu_cache_usage_perc), vllm:prompt_tokens_total, vllm:generation_tokens_total,
vllm:num_preemptions_total, vllm:spec_decode_num_draft_tokens_total / _accepted_tokens_total,
vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds (and the
older vllm:time_per_output_token_seconds), vllm:e2e_request_latency_seconds, vllm:request_success_total.

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
    "draft_tokens_total": ("deskpod_spec_decode_num_draft_tokens", "Tokens guessed by speculative decoding", True),
    "accepted_tokens_total": ("deskpod_spec_decode_num_accepted_tokens", "Guessed tokens the model confirmed", True),
}
# engine stat -> vLLM's names for it
VLLM_STATS = {
    "num_waiting": ["vllm:num_requests_waiting"],
    "num_running": ["vllm:num_requests_running"],
    "kv_usage": ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
    "num_preemptions": ["vllm:num_preemptions"],
    "prompt_tokens_total": ["vllm:prompt_tokens"],
    "generation_tokens_total": ["vllm:generation_tokens"],
    "draft_tokens_total": ["vllm:spec_decode_num_draft_tokens"],
    "accepted_tokens_total": ["vllm:spec_decode_num_accepted_tokens"],
}


class EngineCollector(Collector):
    """Reads `engine.stats()` of every LLM when Prometheus scrapes, so the numbers are never stale."""

    def __init__(self, engines: Callable[[], Iterable[tuple[str, AsyncLLM]]]):
        self.engines = engines

    def collect(self) -> Iterator[Metric]:
        families = [
            (stat, (CounterMetricFamily if counter else GaugeMetricFamily)(name, doc, labels=["model"]))
            for stat, (name, doc, counter) in ENGINE_STATS.items()
        ]
        for stat, names in VLLM_STATS.items():
            _, doc, counter = ENGINE_STATS[stat]
            kind = CounterMetricFamily if counter else GaugeMetricFamily
            families += [(stat, kind(name, doc, labels=["model_name"])) for name in names]
        for model, engine in self.engines():
            stats = engine.stats()
            for stat, family in families:
                family.add_metric([model], float(getattr(stats, stat)))
        yield from (family for _, family in families)


class LinkCollector(Collector):
    """Each box of a linked model: up or not, the weight bytes it holds, and the time steps spent on the link."""

    def __init__(self, engines: Callable[[], Iterable[tuple[str, AsyncLLM]]]):
        self.engines = engines

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("deskpod_link_node_up", "1 while the box serves its share of the model",
                               labels=["model", "node", "address", "role"])
        weights = GaugeMetricFamily("deskpod_link_node_weight_bytes", "Weight bytes the box holds", labels=["model", "node"])
        waits = CounterMetricFamily("deskpod_link_wait_seconds", "Seconds steps waited on the link", labels=["model", "kind"])
        steps = CounterMetricFamily("deskpod_link_steps", "Steps run across the link", labels=["model"])
        for model, engine in self.engines():
            link = engine.link
            if link is None:
                continue
            for node in link.status().nodes:
                up.add_metric([model, str(node["node"]), str(node["address"]), node["role"]],
                              float(node["state"] in ("up", "linked")))
                if node.get("weight_bytes") is not None:
                    weights.add_metric([model, str(node["node"])], float(node["weight_bytes"]))
            timings = link.timings
            waits.add_metric([model, "exchange"], timings.exchange)
            waits.add_metric([model, "handoff"], timings.handoff)
            steps.add_metric([model], float(timings.steps))
        yield from (up, weights, waits, steps)


class ServerMetrics:
    def __init__(self, engines: Callable[[], Iterable[tuple[str, AsyncLLM]]]):
        self.registry = CollectorRegistry()  # one per app: several servers can live in one process
        self.extra: list[Callable[[], str]] = []  # more exposition text after the registry's (custom metrics)
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
        # the same observations under vLLM's names
        self.vllm_ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", ["model_name"],
                                   buckets=TTFT_BUCKETS, registry=r)
        self.vllm_itl = [Histogram(name, "Time between tokens", ["model_name"], buckets=ITL_BUCKETS, registry=r)
                         for name in ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")]
        self.vllm_e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to last token", ["model_name"],
                                  buckets=E2E_BUCKETS, registry=r)
        self.vllm_success = Counter("vllm:request_success", "Requests finished", ["model_name", "finished_reason"],
                                    registry=r)
        r.register(EngineCollector(engines))
        r.register(LinkCollector(engines))

    def timer(self, model: str) -> RequestTimer:
        return RequestTimer(self, model)

    def render(self) -> bytes:
        return generate_latest(self.registry) + "".join(text() for text in self.extra).encode()


class RequestTimer:
    """Observes one generation's latencies from its outputs (the engine's clock is time.monotonic)."""

    def __init__(self, metrics: ServerMetrics, model: str):
        self.m, self.model = metrics, model
        self.last: float | None = None

    def output(self, out: RequestOutput) -> None:
        now = time.monotonic()
        m, model = self.m, self.model
        if self.last is None:  # the first output: its first token (perhaps an end-of-sequence one) is sampled
            ttft = max((out.first_token_time or now) - out.arrival_time, 0.0)
            m.ttft.labels(model).observe(ttft)
            m.vllm_ttft.labels(model).observe(ttft)
        elif out.token_ids:
            gap = (now - self.last) / len(out.token_ids)
            for _ in out.token_ids:
                for histogram in (m.itl, *m.vllm_itl):
                    histogram.labels(model).observe(gap)
        self.last = now
        if out.finish_reason is not None:
            e2e = max(now - out.arrival_time, 0.0)
            m.e2e.labels(model).observe(e2e)
            m.vllm_e2e.labels(model).observe(e2e)
            m.vllm_success.labels(model, out.finish_reason).inc()

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
