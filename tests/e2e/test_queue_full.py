"""A bounded queue: past --max-waiting the server answers 429 with Retry-After, and serves the rest."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

CLIENTS = 5


@pytest.fixture(scope="module")
def tiny_server(serve):
    """One request runs at a time and one more may wait."""
    return serve(["smollm2", "--max-num-seqs", "1", "--max-waiting", "1", "--kv-cache-gb", "0.5"])


def test_queue_full_is_429_with_retry_after(tiny_server) -> None:
    server = tiny_server
    client = server.client(max_retries=0)  # the client would otherwise retry 429s itself

    def ask(i: int) -> object:
        try:
            return client.completions.create(
                model="smollm2", prompt=f"Count to {i}:", max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
            )
        except openai.RateLimitError as e:
            return e

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(ask, range(CLIENTS)))
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    served = [r for r in results if not isinstance(r, openai.RateLimitError)]
    assert refused and served, results
    for e in refused:
        assert e.status_code == 429 and int(e.response.headers["retry-after"]) >= 1
        assert e.body["code"] == "rate_limit_exceeded"
    assert all(r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length" for r in served)
    # nothing left behind: the next request is served
    assert client.completions.create(model="smollm2", prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
    m = server.metrics()
    assert (
        m['deskpod_num_requests_waiting{model="smollm2"}'] == 0
        and m['deskpod_kv_cache_usage_ratio{model="smollm2"}'] == 0
    )
    assert m['deskpod_requests_total{route="/v1/completions",status="429"}'] == len(refused)


def test_a_client_that_gives_up_while_queued_leaves_the_queue(tiny_server) -> None:
    server = tiny_server
    busy = server.client().completions.create(
        model="smollm2", prompt="Once upon a time", max_tokens=2000, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(busy))  # it holds the only running slot now
    with server.http() as http:
        with pytest.raises(httpx.ReadTimeout):  # queued behind it; the client stops waiting
            http.post("/v1/completions", json={"model": "smollm2", "prompt": "Hi", "max_tokens": 4}, timeout=1.0)
    assert _wait_for(lambda: server.metrics()['deskpod_num_requests_waiting{model="smollm2"}'] == 0)
    assert server.metrics()['deskpod_num_requests_running{model="smollm2"}'] == 1  # the first goes on
    busy.close()
    assert _wait_for(lambda: server.metrics()['deskpod_kv_cache_usage_ratio{model="smollm2"}'] == 0)


def _wait_for(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False
