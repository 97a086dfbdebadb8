"""KServe v2 over gRPC end to end: the same server as test_kserve_http.py, driven by the official
tritonclient.grpc (raw tensor contents), the generated stub for typed contents, and grpc.health.v1."""

from __future__ import annotations

import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kserve_models import (
    assert_top_classes,
    API_KEY,
    MAX_REQUEST_MB,
    PROMPT,
    linear_reference,
    pair,
    refused,
    shared_server,
)
from tritonclient.grpc import service_pb2, service_pb2_grpc


@pytest.fixture(scope="module")
def kserve(serve, tmp_path_factory):
    return shared_server("main", serve, tmp_path_factory)


@pytest.fixture
def client(kserve):
    c = grpcclient.InferenceServerClient(kserve.grpc_url)
    yield c
    c.close()


@pytest.fixture
def channel(kserve):
    with grpc.insecure_channel(kserve.grpc_url) as ch:
        yield ch


def inputs(names: tuple[str, ...], arrays: tuple[np.ndarray, ...], datatype: str = "FP32") -> list:
    made = []
    for name, array in zip(names, arrays):
        i = grpcclient.InferInput(name, list(array.shape), datatype)
        i.set_data_from_numpy(array)
        made.append(i)
    return made


def test_server_live_ready_metadata_and_health(client, channel) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata().name == "deskpod"
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.GRPCInferenceService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_model_metadata_and_config(client) -> None:
    meta = client.get_model_metadata("add_sub")
    assert meta.versions == ["1"] and list(meta.inputs[0].shape) == [-1, 4]
    config = client.get_model_config("add_sub").config
    assert config.max_batch_size == 8 and config.dynamic_batching.max_queue_delay_microseconds == 20000


def test_onnx_model_raw_contents(client) -> None:
    a, b = pair(3)
    result = client.infer("add_sub", inputs(("INPUT0", "INPUT1"), (a, b)), request_id="g1")
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6)
    assert result.get_response().id == "g1"


def test_typed_contents(channel) -> None:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    request = service_pb2.ModelInferRequest(model_name="add_sub")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([1, 2, 3, 4])
    request.inputs.add(name="INPUT1", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([4, 3, 2, 1])
    request.outputs.add(name="OUTPUT0")
    reply = stub.ModelInfer(request)
    assert [o.name for o in reply.outputs] == ["OUTPUT0"]
    assert np.frombuffer(reply.raw_output_contents[0], np.float32).tolist() == [5, 5, 5, 5]


@pytest.mark.parametrize("k", [1, 2])
def test_classification_extension(client, k: int) -> None:
    a, _ = pair(3)
    wanted = [grpcclient.InferRequestedOutput("OUTPUT__0", class_count=k)]
    result = client.infer("linear", inputs(("INPUT__0",), (a,)), outputs=wanted)
    assert_top_classes(result.as_numpy("OUTPUT__0"), linear_reference(a), k)


def test_torchscript_python_and_ensemble_models(client) -> None:
    a, b = pair(2)
    linear = client.infer("linear", inputs(("INPUT__0",), (a,)))
    np.testing.assert_allclose(linear.as_numpy("OUTPUT__0"), linear_reference(a), rtol=1e-5, atol=1e-6)
    python = client.infer("py_add_sub", inputs(("INPUT0", "INPUT1"), (a, b)))
    np.testing.assert_allclose(python.as_numpy("OUTPUT1"), a - b, rtol=1e-6)
    ensemble = client.infer("pipeline", inputs(("A", "B"), (a, b)))
    np.testing.assert_allclose(ensemble.as_numpy("DOUBLED_SUM"), 2 * (a + b), rtol=1e-6)


def test_statistics_index_and_model_control(client) -> None:
    a, _ = pair(1)
    client.infer("linear", inputs(("INPUT__0",), (a,)))
    stats = client.get_inference_statistics("linear").model_stats[0]
    assert stats.name == "linear" and stats.inference_stats.success.count >= 1
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["broken"].state == "UNAVAILABLE" and "model.onnx" in index["broken"].reason
    client.unload_model("double")
    assert not client.is_model_ready("double")
    client.load_model("double")
    assert client.is_model_ready("double")


@pytest.mark.parametrize(
    ("model", "make", "code", "words"),
    [
        ("add_sub", lambda: inputs(("INPUT0", "INPUT1"), (np.ones((1, 3), np.float32),) * 2), "INVALID_ARGUMENT", "shape"),
        ("add_sub", lambda: inputs(("INPUT0", "INPUT1"), (np.ones((1, 4), np.float64),) * 2, "FP64"), "INVALID_ARGUMENT", "FP64"),
        ("add_sub", lambda: inputs(("INPUT1",), (np.ones((1, 4), np.float32),)), "INVALID_ARGUMENT", "INPUT0"),
        ("nope", lambda: inputs(("INPUT0",), (np.ones((1, 4), np.float32),)), "NOT_FOUND", "nope"),
        ("broken", lambda: inputs(("X",), (np.ones((1,), np.float32),)), "UNAVAILABLE", "model.onnx"),
        ("py_add_sub", lambda: inputs(("INPUT0", "INPUT1"), (np.full((1, 4), 5000, np.float32),) * 2), "INTERNAL", "above 1000"),
    ],
    ids=["wrong-shape", "wrong-datatype", "missing-input", "unknown-model", "broken-model", "model-raises"],
)
def test_errors_have_their_status_code(client, model: str, make, code: str, words: str) -> None:
    e = refused(lambda: client.infer(model, make()))
    assert e.status() == f"StatusCode.{code}" and words in e.message(), (e.status(), e.message())
    a, b = pair(1)  # and the server goes on
    np.testing.assert_allclose(client.infer("add_sub", inputs(("INPUT0", "INPUT1"), (a, b))).as_numpy("OUTPUT0"), a + b)


def test_unknown_output_is_invalid_argument(client) -> None:
    a, b = pair(1)
    e = refused(
        lambda: client.infer(
            "add_sub", inputs(("INPUT0", "INPUT1"), (a, b)), outputs=[grpcclient.InferRequestedOutput("NOPE")]
        )
    )
    assert e.status() == "StatusCode.INVALID_ARGUMENT" and "NOPE" in e.message()


def test_raw_contents_that_lie_about_size(channel) -> None:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    request = service_pb2.ModelInferRequest(model_name="add_sub")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    request.inputs.add(name="INPUT1", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.extend([b"\0" * 16, b"\0" * 12])
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(request)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "12 bytes of data" in e.value.details()


def test_message_over_the_size_limit(client) -> None:
    big = np.zeros((MAX_REQUEST_MB * 2**20 // 16 + 1, 4), np.float32)
    e = refused(lambda: client.infer("add_sub", inputs(("INPUT0", "INPUT1"), (big, big))))
    assert e.status() == "StatusCode.RESOURCE_EXHAUSTED"


# --- the LLM: ModelStreamInfer, one response per piece of text ---------------------------------------


def prompt_input() -> list:
    prompt = grpcclient.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([PROMPT.encode()], dtype=object))
    return [prompt]


def test_llm_stream_matches_unary_infer(client) -> None:
    parameters = {"max_tokens": 12, "temperature": 0}
    whole = client.infer("smollm2", prompt_input(), parameters=parameters).as_numpy("text_output")[0].decode()
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("smollm2", prompt_input(), request_id="s1", parameters=parameters)
        pieces = []
        while True:
            result, error = results.get(timeout=120)
            assert error is None, error
            pieces.append(result.as_numpy("text_output")[0].decode())
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
    assert len(pieces) > 1 and "".join(pieces) == whole and whole
    assert result.get_response().id == "s1"


def test_stream_reports_errors_and_goes_on(client) -> None:
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("nope", prompt_input())
        a, b = pair(1)
        _, error = results.get(timeout=60)
        assert error is not None and "nope" in error.message()
        client.async_stream_infer("add_sub", inputs(("INPUT0", "INPUT1"), (a, b)))
        result, error = results.get(timeout=60)
        assert error is None
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)
    finally:
        client.stop_stream()


def test_api_key_from_metadata(serve, tmp_path_factory) -> None:
    keyed = shared_server("keyed", serve, tmp_path_factory)
    c = grpcclient.InferenceServerClient(keyed.grpc_url)
    try:
        e = refused(lambda: c.get_model_metadata("add_sub"))
        assert e.status() == "StatusCode.UNAUTHENTICATED" and "API key" in e.message()
        assert c.get_model_metadata("add_sub", headers={"authorization": f"Bearer {API_KEY}"}).name == "add_sub"
    finally:
        c.close()
    with grpc.insecure_channel(keyed.grpc_url) as ch:  # health needs no key
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status == 1
