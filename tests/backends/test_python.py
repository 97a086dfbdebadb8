from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from backend_models import PY_ADD_SUB, PY_ADD_SUB_CONFIG, infer, pair, write_model

from deskpod.backends import InferRequest
from deskpod.errors import BackendError, CorruptModel


@pytest.fixture
def py_root(root):
    write_model(root, "py_add_sub", PY_ADD_SUB_CONFIG, {"1/model.py": PY_ADD_SUB})
    return root


def test_python_model_runs_unchanged(py_root, repo_factory):
    repo = repo_factory(py_root)
    a, b = pair(3)
    response = infer(repo, "py_add_sub", INPUT0=a, INPUT1=b)
    np.testing.assert_allclose(response.outputs["OUTPUT0"], a + b)
    np.testing.assert_allclose(response.outputs["OUTPUT1"], a - b)
    assert repo.metadata("py_add_sub")["platform"] == "python"


def test_initialize_gets_tritons_args(root, repo_factory):
    model = """
    import json
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def initialize(self, args):
            self.args = args

        def execute(self, requests):
            text = json.dumps(self.args).encode()
            return [pb_utils.InferenceResponse([pb_utils.Tensor("ARGS", np.array([text], dtype=np.object_))])
                    for _ in requests]
    """
    config = """
    backend: "python"
    input [ { name: "X" data_type: TYPE_INT32 dims: [ 1 ] } ]
    output [ { name: "ARGS" data_type: TYPE_STRING dims: [ 1 ] } ]
    parameters { key: "greeting" value: { string_value: "hi" } }
    """
    write_model(root, "args", config, {"2/model.py": model})
    repo = repo_factory(root)
    (text,) = infer(repo, "args", X=np.array([1], np.int32)).outputs["ARGS"]
    args = json.loads(text)
    assert set(args) == {"model_config", "model_instance_kind", "model_instance_name", "model_instance_device_id",
                         "model_repository", "model_version", "model_name"}
    assert args["model_name"] == "args" and args["model_version"] == "2" and args["model_instance_kind"] == "CPU"
    assert args["model_repository"] == str(root / "args") and args["model_instance_name"] == "args_0_0"
    config = json.loads(args["model_config"])
    assert config["input"][0]["dims"] == [1] and config["output"][0]["data_type"] == "TYPE_STRING"
    assert config["parameters"]["greeting"]["string_value"] == "hi" and config["max_batch_size"] == 0


def test_error_response_fails_only_its_request(py_root, repo_factory):
    """A TritonError in one response of a batch fails that request; the others of the same batch succeed."""
    repo = repo_factory(py_root)
    a, b = pair(1)
    bad = np.full((1, 4), -5000, np.float32)

    async def run():
        requests = [InferRequest("py_add_sub", {"INPUT0": x, "INPUT1": b}) for x in (a, bad, a, a)]
        return await asyncio.gather(*(repo.infer(r) for r in requests), return_exceptions=True)

    results = asyncio.run(run())
    assert isinstance(results[1], BackendError) and "INPUT0 below -1000" in str(results[1])
    for result in (results[0], results[2], results[3]):
        np.testing.assert_allclose(result.outputs["OUTPUT0"], a + b)
    stats = repo.statistics("py_add_sub")[0]
    assert stats["execution_count"] == 1  # all four were in one execution
    assert stats["inference_stats"]["fail"]["count"] == 1 and stats["inference_stats"]["success"]["count"] == 3


def test_exception_fails_that_execution_only(py_root, repo_factory):
    repo = repo_factory(py_root)
    a, b = pair(1)
    with pytest.raises(BackendError, match="ValueError: INPUT0 above 1000"):
        infer(repo, "py_add_sub", INPUT0=np.full((1, 4), 5000, np.float32), INPUT1=b)
    with pytest.raises(BackendError, match=r"model 'py_add_sub' failed: the model's code called exit\(5\)"):
        infer(repo, "py_add_sub", INPUT0=np.full((1, 4), 777, np.float32), INPUT1=b)
    np.testing.assert_allclose(infer(repo, "py_add_sub", INPUT0=a, INPUT1=b).outputs["OUTPUT1"], a - b)
    assert repo.ready("py_add_sub")


def test_finalize_runs_at_unload(root, repo_factory):
    marker = root / "finalized.txt"
    model = f"""
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            return [pb_utils.InferenceResponse([request.inputs()[0]]) for request in requests]

        def finalize(self):
            with open({str(marker)!r}, "a") as f:
                f.write("finalized\\n")
    """
    config = """
    backend: "python"
    input [ { name: "X" data_type: TYPE_INT32 dims: [ 1 ] } ]
    output [ { name: "X" data_type: TYPE_INT32 dims: [ 1 ] } ]
    """
    write_model(root, "echo", config, {"1/model.py": model})
    repo = repo_factory(root)
    assert infer(repo, "echo", X=np.array([7], np.int32)).outputs["X"].tolist() == [7]
    assert not marker.exists()
    repo.unload("echo")
    assert marker.read_text() == "finalized\n"


def test_broken_python_models_are_unavailable(root, repo_factory):
    config = 'backend: "python"\ninput [ { name: "X" data_type: TYPE_INT32 dims: [ 1 ] } ]\n' \
             'output [ { name: "Y" data_type: TYPE_INT32 dims: [ 1 ] } ]\n'
    write_model(root, "syntax", config, {"1/model.py": "def broken(:\n"})
    write_model(root, "noclass", config, {"1/model.py": "x = 1\n"})
    write_model(root, "exits", config, {"1/model.py": "import sys\nsys.exit(3)\n"})
    write_model(root, "badinit", config, {"1/model.py": "class TritonPythonModel:\n    def initialize(self, args):\n"
                                                         "        raise RuntimeError('no weights')\n"})
    repo = repo_factory(root)
    reasons = {e["name"]: e["reason"] for e in repo.index()}
    assert "importing it failed: SyntaxError" in reasons["syntax"]
    assert "defines no class TritonPythonModel" in reasons["noclass"]
    assert "initialize failed: RuntimeError: no weights" in reasons["badinit"]
    assert "importing it failed: SystemExit: 3" in reasons["exits"]
    with pytest.raises(CorruptModel, match="no weights"):
        repo.load("badinit")


def test_auto_complete_config(root, repo_factory):
    model = """
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        @staticmethod
        def auto_complete_config(config):
            config.add_input({"name": "X", "data_type": "TYPE_FP32", "dims": [2]})
            config.add_output({"name": "Y", "data_type": "TYPE_FP32", "dims": [2]})
            config.set_max_batch_size(4)
            config.set_dynamic_batching()
            return config

        def execute(self, requests):
            return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", r.inputs()[0].as_numpy() * 2)])
                    for r in requests]
    """
    write_model(root, "auto", None, {"1/model.py": model})
    repo = repo_factory(root)
    assert repo.metadata("auto")["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 2]}]
    assert repo.config("auto").HasField("dynamic_batching")
    x = np.ones((2, 2), np.float32)
    np.testing.assert_allclose(infer(repo, "auto", X=x).outputs["Y"], 2 * x)


def test_bls_calls_another_model(add_sub_root, repo_factory):
    """A Python model that calls the ONNX add_sub through BLS, then doubles its OUTPUT0."""
    model = """
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            responses = []
            for request in requests:
                a = pb_utils.get_input_tensor_by_name(request, "A").as_numpy()
                b = pb_utils.get_input_tensor_by_name(request, "B").as_numpy()
                result = pb_utils.InferenceRequest(
                    model_name="add_sub", requested_output_names=["OUTPUT0"],
                    inputs=[pb_utils.Tensor("INPUT0", a), pb_utils.Tensor("INPUT1", b)],
                ).exec()
                if result.has_error():
                    responses.append(pb_utils.InferenceResponse([], error=result.error()))
                    continue
                total = pb_utils.get_output_tensor_by_name(result, "OUTPUT0").as_numpy()
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("DOUBLED", total * 2)]))
            return responses
    """
    config = """
    backend: "python"
    max_batch_size: 8
    input [ { name: "A" data_type: TYPE_FP32 dims: [ -1 ] }, { name: "B" data_type: TYPE_FP32 dims: [ -1 ] } ]
    output [ { name: "DOUBLED" data_type: TYPE_FP32 dims: [ -1 ] } ]
    """
    write_model(add_sub_root, "bls", config, {"1/model.py": model})
    repo = repo_factory(add_sub_root)
    a, b = pair(2)
    np.testing.assert_allclose(infer(repo, "bls", A=a, B=b).outputs["DOUBLED"], 2 * (a + b))
    # the called model's error comes back in the BLS response, and fails this request
    with pytest.raises(BackendError, match=r"input 'INPUT0' has shape \[2, 3\]"):
        infer(repo, "bls", A=a[:, :3], B=b[:, :3])
    assert repo.statistics("add_sub")[0]["inference_count"] == 2


def test_bls_takes_the_model_name_as_bytes(add_sub_root, repo_factory):
    """As Triton's `bls` example does: the model to call comes in a string input, as numpy bytes."""
    model = """
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            responses = []
            for request in requests:
                name = pb_utils.get_input_tensor_by_name(request, "MODEL_NAME").as_numpy()[0]
                inputs = [pb_utils.Tensor("INPUT0", pb_utils.get_input_tensor_by_name(request, "A").as_numpy()),
                          pb_utils.Tensor("INPUT1", pb_utils.get_input_tensor_by_name(request, "B").as_numpy())]
                result = pb_utils.InferenceRequest(model_name=name, requested_output_names=[b"OUTPUT1"],
                                                   inputs=inputs).exec()
                if result.has_error():
                    raise pb_utils.TritonModelException(result.error().message())
                difference = pb_utils.get_output_tensor_by_name(result, "OUTPUT1").as_numpy()
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("DIFFERENCE", difference)]))
            return responses
    """
    config = """
    backend: "python"
    input [ { name: "MODEL_NAME" data_type: TYPE_STRING dims: [ 1 ] },
            { name: "A" data_type: TYPE_FP32 dims: [ 1, 4 ] }, { name: "B" data_type: TYPE_FP32 dims: [ 1, 4 ] } ]
    output [ { name: "DIFFERENCE" data_type: TYPE_FP32 dims: [ 1, 4 ] } ]
    """
    write_model(add_sub_root, "bls_by_name", config, {"1/model.py": model})
    repo = repo_factory(add_sub_root)
    a, b = pair(1)
    name = np.array([b"add_sub"], dtype=object)
    np.testing.assert_allclose(infer(repo, "bls_by_name", MODEL_NAME=name, A=a, B=b).outputs["DIFFERENCE"], a - b)


def test_request_fields_and_async_execute(add_sub_root, repo_factory):
    """request_id(), parameters() (a JSON string), requested_output_names(), BYTES inputs as bytes, and an
    `async def execute` awaiting a BLS call with async_exec()."""
    model = """
    import json
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        async def execute(self, requests):
            responses = []
            for request in requests:
                text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()
                bls = pb_utils.InferenceRequest(
                    model_name="add_sub", requested_output_names=["OUTPUT1"],
                    inputs=[pb_utils.Tensor("INPUT0", np.ones((1, 4), np.float32)),
                            pb_utils.Tensor("INPUT1", np.ones((1, 4), np.float32))],
                )
                diff = pb_utils.get_output_tensor_by_name(await bls.async_exec(), "OUTPUT1").as_numpy()
                info = {
                    "id": request.request_id(),
                    "parameters": json.loads(request.parameters()),
                    "outputs": request.requested_output_names(),
                    "text": [type(t).__name__ for t in text.flat],
                    "diff": diff.tolist(),
                }
                blob = np.array([json.dumps(info).encode()], dtype=np.object_)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("INFO", blob),
                                                             pb_utils.Tensor("UNUSED", blob)]))
            return responses
    """
    config = """
    backend: "python"
    input [ { name: "TEXT" data_type: TYPE_STRING dims: [ 2 ] } ]
    output [ { name: "INFO" data_type: TYPE_STRING dims: [ 1 ] }, { name: "UNUSED" data_type: TYPE_STRING dims: [ 1 ] } ]
    """
    write_model(add_sub_root, "fields", config, {"1/model.py": model})
    repo = repo_factory(add_sub_root)
    request = InferRequest("fields", {"TEXT": np.array(["a", "b"])}, id="req-7", outputs=("INFO",),
                           parameters={"temperature": 0.5})
    response = asyncio.run(repo.infer(request))
    assert list(response.outputs) == ["INFO"] and response.id == "req-7"
    info = json.loads(response.outputs["INFO"][0])
    assert info == {"id": "req-7", "parameters": {"temperature": 0.5}, "outputs": ["INFO"],
                    "text": ["bytes", "bytes"], "diff": [[0.0, 0.0, 0.0, 0.0]]}


def test_raising_request_leaves_concurrent_ones_alone(root, repo_factory):
    """Without dynamic batching each request is its own execution: the one that raises fails alone."""
    write_model(root, "py_add_sub", PY_ADD_SUB_CONFIG.replace("dynamic_batching { }", ""), {"1/model.py": PY_ADD_SUB})
    repo = repo_factory(root)
    a, b = pair(1)
    crash = np.full((1, 4), 5000, np.float32)

    async def run():
        requests = [InferRequest("py_add_sub", {"INPUT0": x, "INPUT1": b}) for x in (a, crash, a)]
        return await asyncio.gather(*(repo.infer(r) for r in requests), return_exceptions=True)

    ok1, failed, ok2 = asyncio.run(run())
    assert isinstance(failed, BackendError) and "INPUT0 above 1000" in str(failed)
    np.testing.assert_allclose(ok1.outputs["OUTPUT0"], a + b)
    np.testing.assert_allclose(ok2.outputs["OUTPUT0"], a + b)


def test_custom_metrics_of_a_python_model(add_sub_root, repo_factory):
    """Triton's custom_metrics example's API: MetricFamily of each kind, a Metric per label set, on /metrics."""
    from deskpod.backends.custom_metrics import exposition

    model = """
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def initialize(self, args):
            self.calls = pb_utils.MetricFamily(name="test_calls_total", description="calls",
                                               kind=pb_utils.MetricFamily.COUNTER).Metric(labels={"model": "counted"})
            self.last = pb_utils.MetricFamily(name="test_last_size", description="last batch",
                                              kind=pb_utils.MetricFamily.GAUGE).Metric(labels={"model": "counted"})
            self.sizes = pb_utils.MetricFamily(name="test_sizes", description="sizes",
                                               kind=pb_utils.MetricFamily.HISTOGRAM).Metric(labels={}, buckets=[1, 4])
            try:
                self.calls.increment(-1)
            except pb_utils.TritonModelException:
                pass
            else:
                raise AssertionError("a counter went down")

        def execute(self, requests):
            responses = []
            for request in requests:
                x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
                self.calls.increment(1)
                self.last.set(x.shape[0])
                self.sizes.observe(x.shape[0])
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", x)]))
            return responses
    """
    config = """
    backend: "python"
    max_batch_size: 8
    input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
    output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]
    """
    write_model(add_sub_root, "counted", config, {"1/model.py": model})
    repo = repo_factory(add_sub_root)
    a, _ = pair(3)
    infer(repo, "counted", X=a)
    infer(repo, "counted", X=a[:1])
    text = exposition()
    assert "# TYPE test_calls_total counter" in text and 'test_calls_total{model="counted"} 2.0' in text
    assert 'test_last_size{model="counted"} 1.0' in text
    assert "# HELP test_sizes sizes" in text and "# TYPE test_sizes histogram" in text
    assert 'test_sizes_bucket{le="1.0"} 1.0' in text and 'test_sizes_bucket{le="4.0"} 2.0' in text
    assert "test_sizes_sum 4.0" in text and "test_sizes_count 2.0" in text
