"""KServe v2 over HTTP end to end: a real `deskpod serve --model-repository` process driven by the
official tritonclient.http (binary tensors and JSON) and raw httpx for what a client library would never
send; models built by the tests (ONNX, TorchScript, Python, an ensemble, a broken one) beside SmolLM2."""

from __future__ import annotations

import gzip
import json

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from kserve_models import (
    API_KEY,
    MAX_REQUEST_MB,
    PROMPT,
    assert_top_classes,
    linear_reference,
    pair,
    refused,
    shared_server,
)
from prometheus_client.parser import text_string_to_metric_families


@pytest.fixture(scope="module")
def kserve(serve, tmp_path_factory):
    return shared_server("main", serve, tmp_path_factory)


@pytest.fixture
def client(kserve):
    c = httpclient.InferenceServerClient(kserve.http_url, concurrency=16, network_timeout=120)
    yield c
    c.close()


@pytest.fixture
def http(kserve):
    with httpx.Client(base_url=f"http://{kserve.http_url}", timeout=120) as h:
        yield h


def inputs(names: tuple[str, ...], arrays: tuple[np.ndarray, ...], binary: bool = True, datatype: str = "FP32") -> list:
    made = []
    for name, array in zip(names, arrays):
        i = httpclient.InferInput(name, list(array.shape), datatype)
        i.set_data_from_numpy(array, binary_data=binary)
        made.append(i)
    return made


# --- server and models ---------------------------------------------------------------------------


def test_server_is_live_ready_and_describes_itself(client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "deskpod" and "binary_tensor_data" in meta["extensions"]


def test_model_metadata_and_config(client) -> None:
    meta = client.get_model_metadata("add_sub")
    assert meta["versions"] == ["1"]
    assert meta["inputs"][0] == {"name": "INPUT0", "datatype": "FP32", "shape": [-1, 4]}
    config = client.get_model_config("add_sub")
    assert config["max_batch_size"] == 8 and config["input"][1]["dims"] == [4]  # numbers, as Triton writes them
    assert client.get_model_metadata("add_sub", "1")["name"] == "add_sub"
    # fields at their defaults are there too, as Triton writes them (its clients read them unchecked)
    python_model = client.get_model_config("double")
    assert python_model["platform"] == "" and python_model["batch_input"] == [] and python_model["default_model_filename"] == ""


@pytest.mark.parametrize("binary", [True, False])
def test_classification_extension(client, binary: bool) -> None:
    a, _ = pair(3)
    wanted = [httpclient.InferRequestedOutput("OUTPUT__0", binary_data=binary, class_count=2)]
    result = client.infer("linear", inputs(("INPUT__0",), (a,), binary), outputs=wanted)
    assert_top_classes(result.as_numpy("OUTPUT__0"), linear_reference(a), 2)
    assert "classification" in client.get_server_metadata()["extensions"]


@pytest.mark.parametrize("binary", [True, False])
def test_onnx_model_binary_and_json(client, binary: bool) -> None:
    a, b = pair(3)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("OUTPUT0", "OUTPUT1")]
    result = client.infer("add_sub", inputs(("INPUT0", "INPUT1"), (a, b), binary), outputs=outputs, request_id="q1")
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6)
    assert result.get_response()["id"] == "q1"


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_request(client, algorithm: str) -> None:
    a, b = pair(2)
    result = client.infer(
        "add_sub", inputs(("INPUT0", "INPUT1"), (a, b)), request_compression_algorithm=algorithm
    )
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)


def test_compressed_body_that_inflates_past_the_limit_is_413(http) -> None:
    bomb = gzip.compress(b"{" + b" " * (MAX_REQUEST_MB * 2**20 + 10) + b"}")
    r = http.post("/v2/models/add_sub/infer", content=bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413 and len(bomb) < 2**20


def test_one_requested_output_only(client) -> None:
    a, b = pair(1)
    result = client.infer(
        "add_sub", inputs(("INPUT0", "INPUT1"), (a, b)), outputs=[httpclient.InferRequestedOutput("OUTPUT1")]
    )
    assert [o["name"] for o in result.get_response()["outputs"]] == ["OUTPUT1"]


def test_json_body_without_content_type(http) -> None:
    body = {
        "inputs": [
            {"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
            {"name": "INPUT1", "shape": [1, 4], "datatype": "FP32", "data": [[1, 1, 1, 1]]},
        ]
    }
    r = http.post("/v2/models/add_sub/infer", content=json.dumps(body).encode())
    assert "content-type" not in r.request.headers
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert outputs["OUTPUT0"]["data"] == [2, 3, 4, 5] and outputs["OUTPUT1"]["shape"] == [1, 4]


def test_torchscript_model(client) -> None:
    x = pair(3)[0]
    result = client.infer("linear", inputs(("INPUT__0",), (x,)))
    np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), linear_reference(x), rtol=1e-5, atol=1e-6)


def test_python_model(client) -> None:
    a, b = pair(2)
    result = client.infer("py_add_sub", inputs(("INPUT0", "INPUT1"), (a, b), binary=False))
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)


def test_ensemble_of_two_models(client) -> None:
    a, b = pair(4)
    result = client.infer("pipeline", inputs(("A", "B"), (a, b)))
    np.testing.assert_allclose(result.as_numpy("DOUBLED_SUM"), 2 * (a + b), rtol=1e-6)


def test_dynamic_batching_batches_concurrent_requests(client) -> None:
    before = client.get_inference_statistics("add_sub")["model_stats"][0]
    a, b = pair(1)
    pending = [client.async_infer("add_sub", inputs(("INPUT0", "INPUT1"), (a, b))) for _ in range(16)]
    for p in pending:
        np.testing.assert_allclose(p.get_result().as_numpy("OUTPUT0"), a + b, rtol=1e-6)
    after = client.get_inference_statistics("add_sub")["model_stats"][0]
    requests = after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
    executions = after["execution_count"] - before["execution_count"]
    assert requests == 16 and executions < requests, (requests, executions)


def test_statistics_and_triton_metrics_agree(client, http) -> None:
    a, b = pair(1)
    client.infer("add_sub", inputs(("INPUT0", "INPUT1"), (a, b)))
    stats = client.get_inference_statistics("add_sub")["model_stats"][0]
    samples = {
        (s.name, s.labels.get("model")): s.value
        for family in text_string_to_metric_families(http.get("/metrics").text)
        for s in family.samples
    }
    assert samples[("nv_inference_request_success", "add_sub")] == stats["inference_stats"]["success"]["count"] > 0
    assert samples[("nv_inference_exec_count", "add_sub")] == stats["execution_count"]
    assert samples[("nv_inference_compute_infer_duration_us", "add_sub")] > 0
    assert all(client.get_inference_statistics()["model_stats"])


# --- model control -------------------------------------------------------------------------------


def test_repository_index_marks_the_broken_model_with_its_reason(client) -> None:
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["add_sub"]["state"] == "READY" and index["pipeline"]["state"] == "READY"
    assert index["broken"]["state"] == "UNAVAILABLE" and "model.onnx" in index["broken"]["reason"]
    assert index["smollm2"]["state"] == "READY"


def test_broken_model_is_503_while_the_others_serve(client, http) -> None:
    assert not client.is_model_ready("broken")
    r = http.get("/v2/models/broken/ready")
    assert r.status_code == 503 and "UNAVAILABLE" in r.json()["error"] and "model.onnx" in r.json()["error"]
    x = np.ones((1,), np.float32)
    e = refused(lambda: client.infer("broken", inputs(("X",), (x,))))
    assert e.status() == "503" and "model.onnx" in e.message()
    assert client.is_model_ready("add_sub")


def test_unload_and_load_without_restart(client) -> None:
    x = pair(1)[0]
    client.unload_model("linear")
    assert not client.is_model_ready("linear")
    assert refused(lambda: client.infer("linear", inputs(("INPUT__0",), (x,)))).status() == "503"
    client.load_model("linear")
    assert client.is_model_ready("linear")
    np.testing.assert_allclose(
        client.infer("linear", inputs(("INPUT__0",), (x,))).as_numpy("OUTPUT__0"), linear_reference(x), rtol=1e-5
    )


# --- bad input: each a clear 4xx -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: inputs(("INPUT0", "INPUT1"), (np.ones((1, 5), np.float32), np.ones((1, 5), np.float32))), "shape"),
        (lambda: inputs(("INPUT0", "INPUT1"), (np.ones((1, 4), np.int32),) * 2, datatype="INT32"), "INT32"),
        (lambda: inputs(("INPUT0",), (np.ones((1, 4), np.float32),)), "INPUT1"),
        (lambda: inputs(("INPUT0", "INPUT1", "EXTRA"), (np.ones((1, 4), np.float32),) * 3), "EXTRA"),
        (lambda: inputs(("INPUT0", "INPUT1"), (np.ones((9, 4), np.float32),) * 2), "8"),
    ],
    ids=["wrong-shape", "wrong-datatype", "missing-input", "unknown-input", "batch-too-large"],
)
def test_bad_inputs_are_400_naming_the_problem(client, make, words: str) -> None:
    e = refused(lambda: client.infer("add_sub", make()))
    assert e.status() == "400" and words in e.message(), e.message()


def test_unknown_output_is_400(client) -> None:
    a, b = pair(1)
    e = refused(
        lambda: client.infer(
            "add_sub", inputs(("INPUT0", "INPUT1"), (a, b)), outputs=[httpclient.InferRequestedOutput("NOPE")]
        )
    )
    assert e.status() == "400" and "NOPE" in e.message()


def test_unknown_model_is_404(client, http) -> None:
    a, b = pair(1)
    e = refused(lambda: client.infer("nope", inputs(("INPUT0", "INPUT1"), (a, b))))
    assert e.status() == "404" and "nope" in e.message()
    assert http.get("/v2/models/nope").status_code == 404
    assert http.post("/v2/models/nope/versions/3/infer", content=b"{}").status_code == 404  # before the body


def test_unknown_v2_route_answers_in_tritons_shape(http) -> None:
    r = http.get("/v2/models/add_sub/no-such-thing")
    assert r.status_code == 404 and r.json() == {"error": "no route GET /v2/models/add_sub/no-such-thing"}


def test_body_that_is_not_json_is_400(http) -> None:
    r = http.post("/v2/models/add_sub/infer", content=b"{inputs: oops")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]


def binary_body(sizes: list[int], blob_bytes: int) -> tuple[bytes, int]:
    header = json.dumps(
        {
            "inputs": [
                {"name": n, "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": size}}
                for n, size in zip(("INPUT0", "INPUT1"), sizes)
            ]
        }
    ).encode()
    return header + b"\0" * blob_bytes, len(header)


@pytest.mark.parametrize(
    ("sizes", "blob", "header_extra", "words"),
    [
        ([16, 16], 24, 0, "binary_data_size is 16, but only 8 bytes"),
        ([16, 16], 40, 0, "40 bytes of binary data after the JSON header"),
        ([12, 20], 32, 0, "12 bytes of data, but shape [1, 4] of FP32 needs 16"),
        ([16, 16], 32, 10_000, "Inference-Header-Content-Length is"),
    ],
    ids=["sizes-past-the-end", "bytes-left-over", "size-not-the-shape", "header-length-past-the-end"],
)
def test_binary_header_that_lies_is_400(http, sizes, blob: int, header_extra: int, words: str) -> None:
    body, header_length = binary_body(sizes, blob)
    r = http.post(
        "/v2/models/add_sub/infer",
        content=body,
        headers={"Inference-Header-Content-Length": str(header_length + header_extra)},
    )
    assert r.status_code == 400 and words in r.json()["error"], r.text


def test_request_over_the_size_limit_is_413(http) -> None:
    big = b"x" * (MAX_REQUEST_MB * 2**20 + 1)
    r = http.post("/v2/models/add_sub/infer", content=big)
    assert r.status_code == 413 and "--max-request-mb" in r.json()["error"]

    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(MAX_REQUEST_MB * 4 + 1):
            yield b"y" * 2**18

    r = http.post("/v2/models/add_sub/infer", content=chunks())
    assert "content-length" not in r.request.headers
    assert r.status_code == 413


def test_python_model_that_fails_fails_that_request_only(client) -> None:
    a, b = pair(1)
    e = refused(lambda: client.infer("py_add_sub", inputs(("INPUT0", "INPUT1"), (a + 5000, b))))
    assert e.status() == "500" and "INPUT0 above 1000" in e.message()
    e = refused(lambda: client.infer("py_add_sub", inputs(("INPUT0", "INPUT1"), (a - 5000, b))))
    assert e.status().startswith(("4", "5")) and "INPUT0 below -1000" in e.message()
    result = client.infer("py_add_sub", inputs(("INPUT0", "INPUT1"), (a, b)))
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)


# --- the LLM -------------------------------------------------------------------------------------


def test_llm_is_a_v2_model(client) -> None:
    assert client.is_model_ready("smollm2")
    meta = client.get_model_metadata("smollm2")
    assert meta["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": [1]}]
    assert client.get_model_config("smollm2")["model_transaction_policy"]["decoupled"] is True


def generate(http, **parameters) -> dict:
    r = http.post("/v2/models/smollm2/generate", json={"text_input": PROMPT, "parameters": parameters})
    assert r.status_code == 200, r.text
    return r.json()


def test_generate_matches_openai_completion_and_stream(kserve, http) -> None:
    reply = generate(http, max_tokens=12, temperature=0)
    assert reply["model_name"] == "smollm2" and reply["model_version"] == "1" and reply["text_output"]
    completion = http.post(
        "/v1/completions", json={"model": "smollm2", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    ).json()
    assert reply["text_output"] == completion["choices"][0]["text"]

    events = []
    with http.stream(
        "POST", "/v2/models/smollm2/generate_stream", json={"text_input": PROMPT, "max_tokens": 12, "temperature": 0}
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in r.iter_lines() if line.startswith("data: ")]
    assert len(events) > 1 and "".join(e["text_output"] for e in events) == reply["text_output"]
    assert events[-1]["finish_reason"] == "length"


def test_llm_through_plain_infer(client, http) -> None:
    prompt = httpclient.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([PROMPT.encode()], dtype=object))
    result = client.infer("smollm2", [prompt], parameters={"max_tokens": 12, "temperature": 0})
    assert result.as_numpy("text_output")[0].decode() == generate(http, max_tokens=12, temperature=0)["text_output"]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"parameters": {}}, 400, "text_input"),
        ({"text_input": "hi", "parameters": {"temperature": "hot"}}, 400, "temperature"),
        ({"text_input": "hi", "parameters": {"max_tokens": 0}}, 400, "max_tokens"),
    ],
)
def test_generate_bad_requests(http, body: dict, status: int, words: str) -> None:
    r = http.post("/v2/models/smollm2/generate", json=body)
    assert r.status_code == status and words in r.json()["error"], r.text


def test_generate_on_a_tensor_model_takes_its_inputs_as_fields(http) -> None:
    r = http.post("/v2/models/add_sub/generate", json={"text_input": "hi"})
    assert r.status_code == 400 and "no input named 'text_input'" in r.json()["error"]
    assert "INPUT0, INPUT1" in r.json()["error"]


# --- the API key ---------------------------------------------------------------------------------


def test_api_key_guards_all_but_health(serve, tmp_path_factory) -> None:
    keyed = shared_server("keyed", serve, tmp_path_factory)
    with httpx.Client(base_url=f"http://{keyed.http_url}", timeout=60) as h:
        assert h.get("/v2/health/live").status_code == 200 and h.get("/v2/health/ready").status_code == 200
        r = h.get("/v2/models/add_sub")
        assert r.status_code == 401 and "API key" in r.json()["error"]
    c = httpclient.InferenceServerClient(keyed.http_url)
    try:
        assert c.get_model_metadata("add_sub", headers={"Authorization": f"Bearer {API_KEY}"})["name"] == "add_sub"
        assert refused(lambda: c.get_model_metadata("add_sub", headers={"Authorization": "Bearer wrong"})).status() == "401"
    finally:
        c.close()
