"""The pieces between the protocols and the models: serve's options for a repository, Triton's JSON for
a config, the error table, LLM sampling parameters, and the nv_* metrics read from statistics."""

from __future__ import annotations

import argparse

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import model_config_pb2 as mc

from deskpod.backends.config import config_to_dict
from deskpod.engine.sampler import InvalidSamplingParams
from deskpod.engine.scheduler import QueueFull
from deskpod.errors import (
    BackendError,
    CorruptModel,
    DeskpodError,
    InvalidRequest,
    ModelNotFound,
    ModelNotReady,
)
from deskpod.server import cli
from deskpod.server.errors import APIError
from deskpod.server.kserve.errors import RequestTooLarge, classify
from deskpod.server.kserve.llm import sampling_params
from deskpod.server.kserve.metrics import NV_METRICS, TritonCollector


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_a_repository_alone_serves_no_llm_and_opens_grpc() -> None:
    config = cli.config_from_args(_args(["--model-repository", "models"]))
    assert config.models == () and config.model_repository == "models"
    assert config.grpc_port == 8001 and config.max_request_bytes == 64 * 2**20


def test_grpc_port_options() -> None:
    assert cli.config_from_args(_args([])).grpc_port is None  # LLMs alone: no gRPC unless asked
    assert cli.config_from_args(_args(["--grpc-port", "9001"])).grpc_port == 9001
    assert cli.config_from_args(_args(["--model-repository", "m", "--no-grpc"])).grpc_port is None
    with pytest.raises(SystemExit):
        _args(["--grpc-port", "9001", "--no-grpc"])
    with pytest.raises(DeskpodError, match="different ports"):
        cli.config_from_args(_args(["--model-repository", "m", "--grpc-port", "8000"]))
    with pytest.raises(DeskpodError, match="--max-request-mb"):
        cli.config_from_args(_args(["--model-repository", "m", "--max-request-mb", "0"]))


def test_config_json_is_tritons() -> None:
    config = mc.ModelConfig(
        name="m",
        max_batch_size=8,
        input=[mc.ModelInput(name="x", data_type=mc.TYPE_FP32, dims=[3, -1])],
        dynamic_batching=mc.ModelDynamicBatching(preferred_batch_size=[4], max_queue_delay_microseconds=100),
        version_policy=mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=[1, 3])),
    )
    config.parameters["k"].string_value = "v"
    data = config_to_dict(config, defaults=False)  # what GET .../config answers
    assert data["input"][0] == {"name": "x", "data_type": "TYPE_FP32", "dims": [3, -1]}
    assert data["dynamic_batching"] == {"preferred_batch_size": [4], "max_queue_delay_microseconds": 100}
    assert data["version_policy"]["specific"]["versions"] == [1, 3]
    assert data["parameters"] == {"k": {"string_value": "v"}} and data["max_batch_size"] == 8


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (ModelNotFound("x"), 404, grpc.StatusCode.NOT_FOUND),
        (ModelNotReady("x"), 503, grpc.StatusCode.UNAVAILABLE),
        (InvalidRequest("x"), 400, grpc.StatusCode.INVALID_ARGUMENT),
        (RequestTooLarge("x"), 413, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (BackendError("x"), 500, grpc.StatusCode.INTERNAL),
        (CorruptModel("x"), 400, grpc.StatusCode.INVALID_ARGUMENT),
        (QueueFull("x"), 429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (InvalidSamplingParams("x"), 400, grpc.StatusCode.INVALID_ARGUMENT),
        (APIError(401, "x"), 401, grpc.StatusCode.UNAUTHENTICATED),
        (RuntimeError("x"), 500, grpc.StatusCode.INTERNAL),
    ],
)
def test_error_table(error: Exception, status: int, code: grpc.StatusCode) -> None:
    assert classify(error)[:2] == (status, code)


def test_sampling_parameters() -> None:
    params = sampling_params({"max_tokens": 5, "temperature": 0, "stop": "\n", "triton_x": True}, room=100)
    assert (params.max_tokens, params.temperature, params.stop) == (5, 0, ("\n",))
    assert sampling_params({}, room=40).max_tokens == 40  # the context's room caps the default
    with pytest.raises(InvalidRequest, match="`top_k` must be int"):
        sampling_params({"top_k": 1.5}, room=10)
    with pytest.raises(InvalidRequest, match="`max_tokens` must be int"):
        sampling_params({"max_tokens": True}, room=10)


def stats_entry(name: str, success: int) -> dict:
    phase = {"count": success, "ns": 3000 * success}
    return {
        "name": name,
        "version": "2",
        "inference_count": 4 * success,
        "execution_count": success,
        "inference_stats": {
            k: phase for k in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
        },
    }


def test_triton_metrics_keep_tritons_names() -> None:
    registry = CollectorRegistry()
    registry.register(TritonCollector(lambda: [stats_entry("a", 2), stats_entry("b", 5)]))
    text = generate_latest(registry).decode()
    samples = {
        (s.name, s.labels["model"], s.labels["version"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert {name for name, _, _ in samples} == set(NV_METRICS)
    assert samples[("nv_inference_request_success", "b", "2")] == 5
    assert samples[("nv_inference_count", "a", "2")] == 8
    assert samples[("nv_inference_queue_duration_us", "b", "2")] == 15.0
    assert "nv_inference_request_success{" in text  # no _total suffix


def test_top_classes_as_triton_writes_them() -> None:
    from deskpod.server.kserve.classification import top_classes

    scores = np.array([[0.1, 2.5, -1.0], [3.0, 3.0, 0.0]], dtype=np.float32)
    got = top_classes(scores, 2, batched=True, labels=["a", "b", "c"])
    assert got.tolist() == [[b"2.500000:1:b", b"0.100000:0:a"], [b"3.000000:0:a", b"3.000000:1:b"]]  # ties: lower index
    assert top_classes(scores[0], 5, batched=False, labels=None).tolist() == [b"2.500000:1", b"0.100000:0", b"-1.000000:2"]
