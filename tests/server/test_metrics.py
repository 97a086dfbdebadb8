"""Latencies observed from engine outputs; the Prometheus text the server renders."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from deskpod.engine.async_engine import RequestOutput
from deskpod.server.metrics import ServerMetrics


def out(tokens: int, finish: str | None = None) -> RequestOutput:
    return RequestOutput("r", [3] * tokens, "x" * tokens, finish, None, 4, 0, arrival_time=0.0, first_token_time=0.0)


def test_timer_observes_first_token_gaps_and_end_to_end() -> None:
    metrics = ServerMetrics(lambda: [])
    timer = metrics.timer("smollm2")
    for o in (out(1), out(1), out(2), out(0, "stop")):  # the end-of-sequence output carries no token
        timer.output(o)
    value = metrics.registry.get_sample_value
    assert value("deskpod_time_to_first_token_seconds_count", {"model": "smollm2"}) == 1
    assert value("deskpod_inter_token_latency_seconds_count", {"model": "smollm2"}) == 3
    assert value("deskpod_e2e_request_latency_seconds_count", {"model": "smollm2"}) == 1
    timer.aborted()
    assert value("deskpod_requests_aborted_total", {"model": "smollm2"}) == 1


def test_render_is_prometheus_text() -> None:
    metrics = ServerMetrics(lambda: [])
    metrics.requests.labels("/v1/models", "200").inc()
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert families["deskpod_requests"].type == "counter"
    assert families["deskpod_time_to_first_token_seconds"].type == "histogram"
    assert families["deskpod_kv_cache_usage_ratio"].type == "gauge"  # declared even with no engine yet
