"""Decoupled Python models and Python models in their own processes, through a running server and the official
clients: several responses per request over the gRPC stream (with and without the empty final response) and
HTTP generate_stream, the refusals of the unary routes in Triton's words, a client that leaves cancelling the
request, and a model that segfaults or cannot load while the others serve."""

from __future__ import annotations

import json
import queue
import time

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from kserve_models import refused, write_model
from support.ports import free_port

COUNTER_CONFIG = """
backend: "python"
model_transaction_policy { decoupled: true }
input [ { name: "N" data_type: TYPE_INT32 dims: [ 1 ] }, { name: "WORD" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "I" data_type: TYPE_INT32 dims: [ 1 ] }, { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] } ]
"""

# N responses, one every 20 ms from a thread of the model's own; stops early when the client has gone (and says
# so in the file the request's `marker` parameter names)
COUNTER = """
import json, threading, time
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self.count, args=(request,)).start()

    def count(self, request):
        sender = request.get_response_sender()
        n = int(pb_utils.get_input_tensor_by_name(request, "N").as_numpy()[0])
        word = pb_utils.get_input_tensor_by_name(request, "WORD").as_numpy()[0].decode()
        marker = json.loads(request.parameters()).get("marker")
        for i in range(n):
            if request.is_cancelled():
                open(marker, "w").write(str(i))
                break
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("I", np.array([i], np.int32)),
                                                    pb_utils.Tensor("TEXT", np.array([f"{word} {i}"], object))]))
            time.sleep(0.02)
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
"""

FRAGILE_CONFIG = """
backend: "python"
input [ { name: "X" data_type: TYPE_INT64 dims: [ 1 ] } ]
output [ { name: "PID" data_type: TYPE_INT64 dims: [ 1 ] } ]
"""

FRAGILE = """
import ctypes, os
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        if any(pb_utils.get_input_tensor_by_name(r, "X").as_numpy()[0] < 0 for r in requests):
            ctypes.string_at(0)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("PID", np.array([os.getpid()]))]) for _ in requests]
"""

BROKEN = "import ctypes\nctypes.string_at(0)\n"  # segfaults while being imported


@pytest.fixture(scope="module")
def urls(serve, tmp_path_factory):
    root = tmp_path_factory.mktemp("decoupled_repository")
    write_model(root, "counter", COUNTER_CONFIG, {"1/model.py": COUNTER})
    write_model(root, "fragile", FRAGILE_CONFIG, {"1/model.py": FRAGILE})
    write_model(root, "broken", FRAGILE_CONFIG, {"1/model.py": BROKEN})
    grpc_port = free_port()
    server = serve(["--model-repository", str(root), "--grpc-port", str(grpc_port)])
    return server.url, f"127.0.0.1:{grpc_port}"


def counter_inputs(n: int, word: str = "tick") -> list:
    count = grpcclient.InferInput("N", [1], "INT32")
    count.set_data_from_numpy(np.array([n], np.int32))
    text = grpcclient.InferInput("WORD", [1], "BYTES")
    text.set_data_from_numpy(np.array([word.encode()], object))
    return [count, text]


@pytest.mark.parametrize("empty_final", [False, True])
def test_a_decoupled_model_streams_over_grpc(urls, empty_final):
    client = grpcclient.InferenceServerClient(urls[1])
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put(error or result))
    try:
        client.async_stream_infer("counter", counter_inputs(3, "a"), request_id="a",
                                  enable_empty_final_response=empty_final)
        client.async_stream_infer("counter", counter_inputs(2, "b"), request_id="b",
                                  enable_empty_final_response=empty_final)
        got = [results.get(timeout=30) for _ in range(5 + 2 * empty_final)]
        for result in got:
            assert not isinstance(result, Exception), result
        texts = {r.get_response().id: [] for r in got}
        for r in got:
            if r.as_numpy("TEXT") is not None:
                texts[r.get_response().id].append(r.as_numpy("TEXT")[0].decode())
        assert texts == {"a": ["a 0", "a 1", "a 2"], "b": ["b 0", "b 1"]}
        flags = {"a": [], "b": []}
        for r in got:
            if "triton_final_response" in r.get_response().parameters:
                flags[r.get_response().id].append(r.get_response().parameters["triton_final_response"].bool_param)
        # asked for: each response says whether it is the last, and the final flag comes as an empty response
        assert flags == ({"a": [False] * 3 + [True], "b": [False] * 2 + [True]} if empty_final else {"a": [], "b": []})
        time.sleep(0.2)
        assert results.empty()
    finally:
        client.stop_stream()  # returns: the stream ends when the client closes its side
        client.close()


def test_unary_routes_refuse_a_decoupled_model_in_tritons_words(urls):
    http, grpc = httpclient.InferenceServerClient(urls[0].removeprefix("http://")), grpcclient.InferenceServerClient(urls[1])
    inputs = [httpclient.InferInput("N", [1], "INT32"), httpclient.InferInput("WORD", [1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([1], np.int32))
    inputs[1].set_data_from_numpy(np.array([b"x"], object))
    for error in (refused(lambda: http.infer("counter", inputs)), refused(lambda: grpc.infer("counter", counter_inputs(1)))):
        assert "doesn't support models with decoupled transaction policy" in error.message()
        assert "generate_stream" in error.message()
    assert http.get_model_config("counter")["model_transaction_policy"]["decoupled"] is True


def sse(response: httpx.Response) -> list[dict]:
    return [json.loads(line.removeprefix("data: ")) for line in response.iter_lines() if line.startswith("data: ")]


def test_generate_stream_gives_each_response_as_an_event(urls):
    with httpx.stream("POST", f"{urls[0]}/v2/models/counter/generate_stream", json={"N": 3, "WORD": "go"},
                      timeout=30) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse(response)
    assert [(e["I"], e["TEXT"]) for e in events] == [(0, "go 0"), (1, "go 1"), (2, "go 2")]
    assert {e["model_name"] for e in events} == {"counter"}
    fragile = httpx.post(f"{urls[0]}/v2/models/fragile/generate", json={"X": 5}, timeout=30).json()
    assert fragile["PID"] > 0  # a plain model answers generate once
    refusal = httpx.post(f"{urls[0]}/v2/models/counter/generate_stream", json={"N": 1, "WORDS": "x"}, timeout=30)
    assert refusal.status_code == 400 and "no input named 'WORDS'" in refusal.json()["error"]
    many = httpx.post(f"{urls[0]}/v2/models/counter/generate", json={"N": 2, "WORD": "x"}, timeout=30)
    assert many.status_code == 400 and "use POST /v2/models/counter/generate_stream" in many.json()["error"]


def test_a_client_that_leaves_cancels_its_request(urls, tmp_path):
    marker = tmp_path / "cancelled-at"
    body = {"N": 1000, "WORD": "w", "parameters": {"marker": str(marker)}}
    with httpx.stream("POST", f"{urls[0]}/v2/models/counter/generate_stream", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists() and int(marker.read_text()) < 1000  # the model saw is_cancelled() and stopped


def test_a_segfault_fails_its_request_and_the_rest_go_on(urls):
    client = httpclient.InferenceServerClient(urls[0].removeprefix("http://"))

    def call(x: int) -> int:
        value = httpclient.InferInput("X", [1], "INT64")
        value.set_data_from_numpy(np.array([x], np.int64))
        return int(client.infer("fragile", [value]).as_numpy("PID")[0])

    before = call(1)
    error = refused(lambda: call(-1))
    assert "killed by SIGSEGV" in error.message() and error.status() == "500"
    streamed = httpx.post(f"{urls[0]}/v2/models/fragile/generate", json={"X": 2}, timeout=30)
    assert streamed.status_code == 200
    assert call(1) != before  # started again, in a new process
    assert client.is_server_live() and client.is_model_ready("fragile") and client.is_model_ready("counter")
    broken = {m["name"]: m for m in client.get_model_repository_index()}["broken"]
    assert broken["state"] == "UNAVAILABLE" and "killed by SIGSEGV" in broken["reason"]
