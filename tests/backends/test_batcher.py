"""Dynamic batching and instance groups, observed through statistics and through what the models record."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from backend_models import (
    ADD_SUB_CONFIG,
    WINDOWS_MODEL,
    add_sub_onnx,
    pair,
    write_model,
)

from deskpod.backends import InferRequest
from deskpod.errors import ModelNotReady


def _add_sub(root, name, batching: str, instances: int = 1, width: int | str = 4, dims: str = "4"):
    config = ADD_SUB_CONFIG.replace('name: "add_sub"', f'name: "{name}"').replace("dims: [ 4 ]", f"dims: [ {dims} ]")
    config = config.replace("dynamic_batching { max_queue_delay_microseconds: 2000 }", batching)
    write_model(root, name, config + f"\ninstance_group [ {{ count: {instances} }} ]\n")
    add_sub_onnx(root / name / "1" / "model.onnx", width=width)


async def _many(repo, model, inputs_list):
    return await asyncio.gather(*(repo.infer(InferRequest(model, inputs)) for inputs in inputs_list))


def _inputs(n, width=4):
    return [dict(zip(("INPUT0", "INPUT1"), pair(1, width, seed=i))) for i in range(n)]


def _executed(stats):
    return {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}


def test_concurrent_requests_are_batched(root, repo_factory):
    _add_sub(root, "batched", "dynamic_batching { max_queue_delay_microseconds: 2000 }")
    repo = repo_factory(root)
    inputs = _inputs(32)
    responses = asyncio.run(_many(repo, "batched", inputs))
    for given, response in zip(inputs, responses):  # each request gets its own rows back
        np.testing.assert_allclose(response.outputs["OUTPUT0"], given["INPUT0"] + given["INPUT1"])
    stats = repo.statistics("batched")[0]
    assert stats["inference_count"] == 32
    assert stats["execution_count"] < 32
    executed = _executed(stats)
    assert max(executed) <= 8 and max(executed) > 1
    assert sum(size * count for size, count in executed.items()) == 32
    assert sum(executed.values()) == stats["execution_count"]


def test_without_dynamic_batching_one_request_per_execution(root, repo_factory):
    _add_sub(root, "single", "")
    repo = repo_factory(root)
    asyncio.run(_many(repo, "single", _inputs(12)))
    stats = repo.statistics("single")[0]
    assert stats["execution_count"] == stats["inference_count"] == 12
    assert _executed(stats) == {1: 12}


def test_requests_with_different_shapes_are_not_merged(root, repo_factory):
    _add_sub(root, "ragged", "dynamic_batching { max_queue_delay_microseconds: 2000 }", width="width", dims="-1")
    repo = repo_factory(root)
    inputs = [d for pair_ in zip(_inputs(8, width=3), _inputs(8, width=5)) for d in pair_]
    responses = asyncio.run(_many(repo, "ragged", inputs))
    for given, response in zip(inputs, responses):
        np.testing.assert_allclose(response.outputs["OUTPUT1"], given["INPUT0"] - given["INPUT1"])
    stats = repo.statistics("ragged")[0]
    assert stats["inference_count"] == 16 and 2 <= stats["execution_count"] < 16


def test_preferred_batch_size_is_dispatched_without_waiting(root, repo_factory):
    # a 60 s queue delay would hang the test if a preferred batch did not go out at once
    _add_sub(root, "preferred", "dynamic_batching { preferred_batch_size: [ 2 ] max_queue_delay_microseconds: 60000000 }")
    repo = repo_factory(root)

    async def run():
        return await asyncio.wait_for(_many(repo, "preferred", _inputs(4)), 30)

    asyncio.run(run())
    assert _executed(repo.statistics("preferred")[0]) == {2: 2}


def test_queue_delay_waits_for_later_requests(root, repo_factory):
    _add_sub(root, "delayed", "dynamic_batching { max_queue_delay_microseconds: 500000 }")
    repo = repo_factory(root)
    first, second = _inputs(2)

    async def run():
        early = asyncio.ensure_future(repo.infer(InferRequest("delayed", first)))
        await asyncio.sleep(0.05)  # well inside the 0.5 s delay: the first request is still waiting for company
        late = repo.infer(InferRequest("delayed", second))
        return await asyncio.gather(early, late)

    asyncio.run(run())
    assert _executed(repo.statistics("delayed")[0]) == {2: 1}


def test_instance_group_executes_in_parallel(root, repo_factory):
    log = root / "windows.log"
    log.touch()
    config = f"""
    backend: "python"
    input [ {{ name: "X" data_type: TYPE_INT32 dims: [ 1 ] }} ]
    output [ {{ name: "Y" data_type: TYPE_INT32 dims: [ 1 ] }} ]
    instance_group [ {{ count: 2 kind: KIND_CPU }} ]
    parameters [ {{ key: "log" value: {{ string_value: "{log}" }} }},
                 {{ key: "wait_for" value: {{ string_value: "2" }} }} ]
    """
    write_model(root, "windows", config, {"1/model.py": WINDOWS_MODEL})
    repo = repo_factory(root)

    async def run():
        return await asyncio.gather(*(repo.infer(InferRequest("windows", {"X": np.array([i], np.int32)})) for i in range(2)))

    responses = asyncio.run(run())
    assert [r.outputs["Y"].tolist() for r in responses] == [[0], [1]]
    events = log.read_text().split("\n")[:-1]
    # both executions started before either ended: their windows overlap, on two different instances
    assert [e.split()[0] for e in events] == ["start", "start", "end", "end"]
    assert {e.split()[1] for e in events} == {"windows_0_0", "windows_0_1"}


SLOW_MODEL = """
import time
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        time.sleep(0.2)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", r.inputs()[0].as_numpy())]) for r in requests]
"""


def test_unload_lets_running_requests_finish(root, repo_factory):
    config = """
    backend: "python"
    input [ { name: "X" data_type: TYPE_INT32 dims: [ 1 ] } ]
    output [ { name: "Y" data_type: TYPE_INT32 dims: [ 1 ] } ]
    """
    write_model(root, "slow", config, {"1/model.py": SLOW_MODEL})
    repo = repo_factory(root)

    async def run():
        running = [asyncio.ensure_future(repo.infer(InferRequest("slow", {"X": np.array([i], np.int32)}))) for i in range(3)]
        await asyncio.sleep(0.05)
        await asyncio.to_thread(repo.unload, "slow")
        with pytest.raises(ModelNotReady):
            await repo.infer(InferRequest("slow", {"X": np.array([9], np.int32)}))
        return await asyncio.gather(*running)

    assert [r.outputs["Y"].tolist() for r in asyncio.run(run())] == [[0], [1], [2]]
    assert repo.index() == [{"name": "slow", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}]
    assert json.dumps(repo.statistics()) == "[]"
