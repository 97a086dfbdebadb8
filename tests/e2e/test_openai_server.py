"""`deskpod serve` end to end: a real server on the real SmolLM2 and MiniLM, called with the official
`openai` client, streaming and not; greedy outputs equal the engine's own for the same prompt."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch

from deskpod.engine.llm import LLM
from deskpod.engine.sampler import SamplingParams

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
PROMPT = "The three primary colours are"
MAX_TOKENS = 24
REFERENCE = Path(__file__).parents[1] / "data" / "minilm-reference.json"


@pytest.fixture(scope="module")
def llm(smollm2_gguf: Path) -> LLM:
    """The engine in this process: what the server must reproduce."""
    return LLM("smollm2")


def greedy(llm: LLM, ids: list[int], max_tokens: int = MAX_TOKENS, **params):
    return llm.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0, **params))[0]


def test_models_are_listed(server) -> None:
    ids = {m.id for m in server.client().models.list()}
    assert ids == {"smollm2", "minilm"}
    assert server.client().models.retrieve("smollm2").owned_by == "deskpod"


def test_chat_greedy_matches_the_engine(server, llm: LLM) -> None:
    prompt_ids = llm.chat_prompt(MESSAGES)
    want = greedy(llm, prompt_ids)
    reply = server.client().chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == len(want.token_ids)
    assert reply.usage.total_tokens == len(prompt_ids) + len(want.token_ids)
    assert reply.model == "smollm2" and reply.object == "chat.completion"


def test_chat_stream_matches_the_engine(server, llm: LLM) -> None:
    want = greedy(llm, llm.chat_prompt(MESSAGES))
    stream = server.client().chat.completions.create(
        model="smollm2",
        messages=MESSAGES,
        max_completion_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [want.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert len({c.id for c in chunks}) == 1


def test_completion_greedy_matches_the_engine(server, llm: LLM) -> None:
    ids = llm.prompt_ids(PROMPT)
    want = greedy(llm, ids, 16)
    reply = server.client().completions.create(model="smollm2", prompt=PROMPT, max_tokens=16, temperature=0)
    assert reply.choices[0].text == want.text and reply.choices[0].finish_reason == "length" == want.finish_reason
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 16)
    # the same prompt as token ids, streamed
    stream = server.client().completions.create(model="smollm2", prompt=ids, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == want.text


def test_stop_strings(server, llm: LLM) -> None:
    want = greedy(llm, llm.prompt_ids(PROMPT), 40, stop=(",",))
    reply = server.client().completions.create(model="smollm2", prompt=PROMPT, max_tokens=40, temperature=0, stop=",")
    assert reply.choices[0].text == want.text and "," not in want.text
    assert reply.choices[0].finish_reason == "stop"


def test_chat_logprobs(server) -> None:
    reply = server.client().chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens and 1 <= len(content) <= 8
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].token == t.token  # greedy picks the most likely token
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob)
        assert bytes(t.bytes) == t.token.encode()


def test_completion_logprobs_streamed(server) -> None:
    stream = server.client().completions.create(
        model="smollm2", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, stream=True
    )
    tokens = [lp for c in stream for lp in (c.choices[0].logprobs.token_logprobs if c.choices[0].logprobs else [])]
    assert len(tokens) == 6 and all(v <= 0 for v in tokens)


def test_seeded_sampling_is_reproducible(server) -> None:
    def sample() -> str:
        reply = server.client().completions.create(
            model="smollm2", prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, seed=1234
        )
        return reply.choices[0].text

    assert sample() == sample()


def test_embeddings_match_transformers(server) -> None:
    reference = json.loads(REFERENCE.read_text())
    client = server.client()
    for encoding in ({}, {"encoding_format": "float"}):  # unless told, the client asks for base64 and decodes it
        reply = client.embeddings.create(model="minilm", input=reference["sentences"], **encoding)
        assert [d.index for d in reply.data] == [0, 1, 2] and reply.usage.prompt_tokens > 0
        for got, want in zip(reply.data, reference["embeddings"], strict=True):
            cosine = torch.nn.functional.cosine_similarity(torch.tensor(got.embedding), torch.tensor(want), dim=0)
            assert cosine >= 0.999
    one = client.embeddings.create(model="minilm", input="one text", encoding_format="base64")
    assert len(one.data) == 1 and len(np.frombuffer(base64.b64decode(one.data[0].embedding), dtype="<f4")) == 384


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": MESSAGES, "temperature": 3}, "temperature"),
        ("/v1/chat/completions", {"messages": MESSAGES, "n": 0}, "n"),
        ("/v1/chat/completions", {"messages": MESSAGES, "top_p": 1.5}, "top_p"),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": "many"}, "max_tokens"),
        ("/v1/chat/completions", {"messages": "hello"}, "messages"),
        ("/v1/chat/completions", {}, "messages"),
        ("/v1/completions", {"prompt": PROMPT, "logprobs": 50}, "logprobs"),
        ("/v1/completions", {"prompt": [10**9]}, "prompt"),
        ("/v1/completions", {"prompt": "word " * 9000}, "prompt"),  # longer than the context
        ("/v1/embeddings", {"input": [1, 2, 3]}, "input"),
    ],
)
def test_bad_requests_are_400_naming_the_field(server, route: str, body: dict, param: str) -> None:
    model = "minilm" if "embeddings" in route else "smollm2"
    with server.http() as http:
        response = http.post(route, json={"model": model, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_openai_client_raises_on_400_and_404(server) -> None:
    client = server.client(max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="smollm2", messages=MESSAGES, temperature=-1)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="smollm2", input="x")  # a language model, not an embedding one


def test_api_key_is_required_except_for_health(server) -> None:
    for path in ("/v1/models", "/metrics"):
        plain = httpx.get(server.url + path)
        assert plain.status_code == 401 and plain.json()["error"]["code"] == "invalid_api_key"
        wrong = httpx.get(server.url + path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert httpx.get(server.url + path, headers={"Authorization": f"Bearer {server.api_key}"}).status_code == 200
    assert httpx.post(server.url + "/v1/chat/completions", json={}).status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()


def _wait_for(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


SMOL = '{model="smollm2"}'


def test_disconnect_mid_stream_frees_the_kv_blocks(server) -> None:
    before = server.metrics()
    assert before[f"deskpod_num_requests_running{SMOL}"] == 0
    stream = server.client().completions.create(
        model="smollm2", prompt=PROMPT, max_tokens=2000, temperature=0, extra_body={"ignore_eos": True}, stream=True
    )
    for i, _ in enumerate(stream):
        if i == 5:
            break
    during = server.metrics()
    assert during[f"deskpod_num_requests_running{SMOL}"] == 1
    assert during[f"deskpod_kv_cache_blocks_free{SMOL}"] < before[f"deskpod_kv_cache_blocks_free{SMOL}"]
    stream.close()  # the client goes away mid-stream
    baseline = before[f"deskpod_kv_cache_blocks_free{SMOL}"]
    assert _wait_for(lambda: server.metrics()[f"deskpod_kv_cache_blocks_free{SMOL}"] == baseline)
    after = server.metrics()
    assert after[f"deskpod_num_requests_running{SMOL}"] == 0 and after[f"deskpod_kv_cache_usage_ratio{SMOL}"] == 0
    assert after[f"deskpod_requests_aborted_total{SMOL}"] == before.get(f"deskpod_requests_aborted_total{SMOL}", 0) + 1
    assert after[f"deskpod_generation_tokens_total{SMOL}"] < before[f"deskpod_generation_tokens_total{SMOL}"] + 200


def test_metrics_parse_and_count(server) -> None:
    server.client().chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=4, temperature=0)
    m = server.metrics()
    assert m['deskpod_requests_total{route="/v1/chat/completions",status="200"}'] >= 1
    assert m['deskpod_requests_total{route="/v1/chat/completions",status="400"}'] >= 1
    for histogram in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        assert m[f"deskpod_{histogram}_count{SMOL}"] >= 1
        assert m[f'deskpod_{histogram}_bucket{{le="+Inf",model="smollm2"}}'] == m[f"deskpod_{histogram}_count{SMOL}"]
    for gauge in ("num_requests_waiting", "num_requests_running", "kv_cache_usage_ratio", "kv_cache_blocks_total"):
        assert f"deskpod_{gauge}{SMOL}" in m
    assert m[f"deskpod_prompt_tokens_total{SMOL}"] > 0 and m[f"deskpod_generation_tokens_total{SMOL}"] > 0
    assert f"deskpod_num_preemptions_total{SMOL}" in m
    assert m['deskpod_embedding_input_tokens_total{model="minilm"}'] > 0


def test_non_loopback_without_key_is_refused() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DESKPOD_API_KEY"}
    cmd = [sys.executable, "-m", "deskpod.server.cli", "--host", "0.0.0.0"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1
    assert "refusing to listen on 0.0.0.0 without an API key" in result.stderr and "--insecure" in result.stderr
