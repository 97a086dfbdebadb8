"""One model across two boxes: greedy tokens as on one box (pipeline and tensor parallel, SmolLM2 and tiny
random models of several architectures), batching, preemption and cancellation across the link, each box
holding its share of the weights as the planner says, and the faults — a box killed mid-stream, a box that
hangs, a wrong token, a wrong model, no head — each ending in a named error within a bounded time."""

from __future__ import annotations

import json
import re
import signal
import time

import httpx
import pytest
from support.architectures import CASES, build_hf, prompts, write_gguf
from support.linking import TOKEN, Box, linked_tokens, reference, smollm2_prompts
from support.ports import free_port

from deskpod.store import Store



# --- greedy tokens as on one box ------------------------------------------------------------------------

# tensor parallel adds the boxes' partial sums in another order than one box's kernels: exact (float32 weights)
# it matches to the last token; with int8 activations (compact blocks) an early rounding can flip a near-tie
@pytest.mark.parametrize("parallel,weights", [("pipeline", "compact"), ("tensor", "float32")])
def test_smollm2_greedy_as_on_one_box(linked, two_boxes, store, smollm2_gguf, parallel, weights):
    link = linked(two_boxes, "smollm2", parallel=parallel, weights=weights)
    ids = smollm2_prompts(store)
    assert linked_tokens(link, "smollm2", ids, weights) == reference(smollm2_gguf, ids, weights)
    chat = link.client().chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi!"}],
                                                 max_tokens=8, temperature=0)
    assert chat.choices[0].message.content


TINY = [  # (case, file, parallel, weights)
    ("llama", "gguf", "pipeline", "compact"),  # quantized blocks of mixed types
    ("llama", "gguf", "tensor", "float32"),
    ("qwen3", "hf", "tensor", "float32"),  # per-head q/k norms
    ("gemma3", "hf", "pipeline", "float32"),  # sandwich norms, sliding window, local RoPE
    ("gemma2", "hf", "tensor", "float32"),  # softcaps, tied embeddings split by vocabulary rows
    ("qwen3-moe", "hf", "tensor", "float32"),  # experts split by columns
]


@pytest.mark.parametrize("case,kind,parallel,weights", TINY, ids=["-".join(t) for t in TINY])
def test_tiny_models_greedy_as_on_one_box(linked, tmp_path, store_home, case, kind, parallel, weights):
    folder = build_hf(CASES[case], tmp_path / case)
    path = write_gguf(CASES[case], folder, tmp_path / f"{case}.gguf", quantized=True) if kind == "gguf" else folder
    boxes = [Box(store_home), Box(tmp_path / "worker")]
    name = f"tiny-{case}-{kind}"
    for box in boxes:
        Store(box.home).pull(str(path), name=name, progress=False)
    link = linked(boxes, name, parallel=parallel, weights=weights)
    ids = prompts(3, 20)
    assert linked_tokens(link, name, ids, weights) == reference(path, ids, weights)


# --- the engine's work across the link ------------------------------------------------------------------


def test_preemption_and_cancellation_across_the_link(linked, two_boxes, store, smollm2_gguf):
    # a KV pool of ~40 blocks on the worker (the smallest box's decides): four requests of ~15 blocks cannot all
    # stay, some are preempted and computed again
    link = linked(two_boxes, "smollm2", parallel="pipeline", weights="float32",
                  extra=("--kv-cache-gb", "0.022", "--ctx", "512"))
    ids = [p * 8 for p in smollm2_prompts(store)]
    want = reference(smollm2_gguf, ids, "float32", max_tokens=200)
    with httpx.Client(base_url=link.url, headers={"Authorization": "Bearer link-test-key"}, timeout=120) as http:
        with http.stream("POST", "/v1/completions", json={"model": "smollm2", "prompt": ids[0], "max_tokens": 500,
                                                           "stream": True, "ignore_eos": True}) as stream:
            for _ in zip(range(5), stream.iter_lines()):  # a few tokens, then the client goes away
                pass
    assert linked_tokens(link, "smollm2", ids, "float32", max_tokens=200) == want
    with link.http() as http:
        metrics = http.get("/metrics").text
    preempted = [line for line in metrics.splitlines() if line.startswith("deskpod_num_preemptions_total")]
    assert float(preempted[0].split()[-1]) > 0, "no request was preempted: the test did not test preemption"
    assert 'deskpod_num_requests_running{model="smollm2"} 0.0' in metrics


def test_each_box_holds_its_planned_share(linked, two_boxes, smollm2_gguf):
    """What each box holds against `deskpod plan --hardware digits-x2`'s weights per box, for the same file."""
    plan = json.loads(two_boxes[0].run(["plan", str(smollm2_gguf), "--hardware", "digits-x2", "--json"]).stdout)
    per_box = plan["memory"]["per_box"]["weights"]
    for parallel in ("pipeline", "tensor"):
        link = linked(two_boxes, "smollm2", parallel=parallel)
        with link.http() as http:
            status = http.get("/metrics").text
        held = {line.split('node="')[1].split('"')[0]: float(line.split()[-1])
                for line in status.splitlines() if line.startswith("deskpod_link_node_weight_bytes")}
        assert set(held) == {"0", "1"}
        for node, size in held.items():
            assert abs(size / per_box - 1) < 0.15, f"{parallel}: node {node} holds {size:,.0f} B, the plan {per_box:,.0f}"
        link.stop()


# --- faults ---------------------------------------------------------------------------------------------


def _stream_until_error(link, seconds: float) -> tuple[str, float]:
    """Stream a long request; (the error event's text, seconds from the first token to it)."""
    with link.http() as http, http.stream("POST", "/v1/completions", json={
            "model": "smollm2", "prompt": "Once upon a time", "max_tokens": 2000, "stream": True, "ignore_eos": True}) as s:
        first = None
        for line in s.iter_lines():
            if first is None and line.startswith("data: {") and '"text"' in line:
                first = time.monotonic()
                link.on_first_token()
            if '"error"' in line:
                return line, time.monotonic() - first
            if time.monotonic() - (first or time.monotonic()) > seconds:
                break
    raise AssertionError("the stream did not end with an error")


def test_worker_killed_mid_stream_then_joins_again(linked, two_boxes, store, smollm2_gguf):
    link = linked(two_boxes, "smollm2", parallel="pipeline")
    link.on_first_token = lambda: link.workers[1].send_signal(signal.SIGKILL)
    error, after = _stream_until_error(link, seconds=30)
    assert "node 1 (127.0.0.1) lost" in error and "model_not_ready" in error
    assert after < 5, f"the loss was reported {after:.1f} s after the kill"
    health = link.health()
    assert health.status_code == 503 and health.json()["status"] == "degraded"
    assert "node 1 (127.0.0.1) lost" in health.json()["links"]["smollm2"]["reason"]
    with link.http() as http:
        refused = http.post("/v1/completions", json={"model": "smollm2", "prompt": "Hi", "max_tokens": 2})
        assert refused.status_code == 503 and "node 1 (127.0.0.1) lost" in refused.text
        assert http.get("/v2/health/ready").status_code == 503
        assert http.get("/v2/health/live").status_code == 200  # the head itself is fine: no restart

    link.start_worker(1)  # the same box comes back: the head serves again without a restart
    link.wait_healthy(120)
    ids = smollm2_prompts(store)[:2]
    assert linked_tokens(link, "smollm2", ids, "compact") == reference(smollm2_gguf, ids, "compact")


def test_a_hung_box_times_out(linked, two_boxes):
    link = linked(two_boxes, "smollm2", parallel="tensor", extra=("--link-timeout", "3"))
    link.on_first_token = lambda: link.workers[1].send_signal(signal.SIGSTOP)
    try:
        error, after = _stream_until_error(link, seconds=30)
    finally:
        link.workers[1].kill()
    assert "stopped answering within 3 s" in error or "lost" in error
    assert after < 3 + 5, f"a 3 s link timeout ended the request after {after:.1f} s"


def test_wrong_token_is_refused_before_anything_is_exchanged(linked, two_boxes):
    link = linked(two_boxes, "smollm2", parallel="pipeline")
    started = time.monotonic()
    result = two_boxes[1].run(["join", link.endpoint, "--link-token", "not-the-token"], timeout=30)
    assert result.returncode != 0 and time.monotonic() - started < 20
    assert "link token does not match" in result.stderr
    assert "model" not in result.stderr.split("error:")[-1]  # refused before the model was named
    assert "refused a join with a wrong link token" in link.head_log()
    assert link.health().status_code == 200  # the link it tried to join serves on


def test_a_box_with_another_model_is_refused_naming_both(linked, tmp_path, store_home, two_boxes):
    other = tmp_path / "other"
    folder = build_hf(CASES["llama"], tmp_path / "llama")
    Store(other).pull(str(folder), name="smollm2", progress=False)  # another model under the head's model's name
    head_box = two_boxes[0]
    endpoint = f"127.0.0.1:{free_port()}"
    head = head_box.start(["serve", "smollm2", "--nodes", "2", "--link", endpoint, "--link-token", TOKEN,
                           "--port", str(free_port())], tmp_path / "head.log")
    try:
        result = Box(other).run(["join", endpoint, "--link-token", TOKEN, "--wait", "60"], timeout=120)
        assert result.returncode != 0
        message = next(line for line in result.stderr.splitlines() if line.startswith("error:"))
        assert "node 1 (127.0.0.1) holds smollm2 (" in message and "the head serves smollm2 (" in message
        digests = re.findall(r"\(([0-9a-f]{64})\)", message)
        assert len(set(digests)) == 2, message  # both digests named, and they differ
        assert head.poll() is None  # the head goes on waiting for a box with the right model
    finally:
        head.send_signal(signal.SIGINT)
        head.wait(15)


def test_a_box_that_cannot_reach_the_head_says_so(worker_home):
    result = Box(worker_home).run(["join", f"127.0.0.1:{free_port()}", "--link-token", TOKEN, "--wait", "0"])
    assert result.returncode == 1
    assert "cannot reach the head at 127.0.0.1:" in result.stderr


def test_link_options_are_checked():
    box = Box(Store().home)
    short = box.run(["serve", "smollm2", "--nodes", "2", "--link", "127.0.0.1:29999", "--link-token", "short"])
    assert short.returncode == 1 and "token of at least 8 characters" in short.stderr
    wildcard = box.run(["serve", "smollm2", "--nodes", "2", "--link", "0.0.0.0:29999", "--link-token", TOKEN])
    assert wildcard.returncode == 1 and "not a wildcard" in wildcard.stderr
    two = box.run(["serve", "smollm2", "minilm", "--nodes", "2", "--link", "127.0.0.1:29999", "--link-token", TOKEN])
    assert two.returncode == 1 and "a link serves one model" in two.stderr
