from __future__ import annotations

import numpy as np
import pytest
from backend_models import WINDOWS_MODEL, infer, pair, write_model

from deskpod.errors import InvalidRequest, ModelNotReady

MUL_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            y = pb_utils.get_input_tensor_by_name(request, "Y").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("Z", x * y)]))
        return responses
"""

MUL_CONFIG = """
backend: "python"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "Z" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""

# listed out of order on purpose: "square" needs what "add_sub" produces, so the DAG, not the list, decides
ENSEMBLE_CONFIG = """
name: "pipeline"
platform: "ensemble"
max_batch_size: 8
input [ { name: "A" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "B" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "PRODUCT" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "SUM" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling {
  step [
    {
      model_name: "mul"
      model_version: -1
      input_map { key: "X" value: "sum" }
      input_map { key: "Y" value: "diff" }
      output_map { key: "Z" value: "PRODUCT" }
    },
    {
      model_name: "add_sub"
      model_version: 1
      input_map { key: "INPUT0" value: "A" }
      input_map { key: "INPUT1" value: "B" }
      output_map { key: "OUTPUT0" value: "sum" }
      output_map { key: "OUTPUT1" value: "diff" }
    },
    {
      model_name: "add_sub"
      input_map { key: "INPUT0" value: "sum" }
      input_map { key: "INPUT1" value: "B" }
      output_map { key: "OUTPUT1" value: "SUM" }
    }
  ]
}
"""


@pytest.fixture
def ensemble_root(add_sub_root):
    write_model(add_sub_root, "mul", MUL_CONFIG, {"1/model.py": MUL_MODEL})
    write_model(add_sub_root, "pipeline", ENSEMBLE_CONFIG)
    return add_sub_root


def test_ensemble_runs_the_dag(ensemble_root, repo_factory):
    repo = repo_factory(ensemble_root)
    a, b = pair(3)
    out = infer(repo, "pipeline", A=a, B=b).outputs
    assert list(out) == ["PRODUCT", "SUM"]
    np.testing.assert_allclose(out["PRODUCT"], (a + b) * (a - b), rtol=1e-6)
    np.testing.assert_allclose(out["SUM"], a, rtol=1e-5, atol=1e-6)  # (a + b) - b
    assert repo.metadata("pipeline")["platform"] == "ensemble"
    stats = {s["name"]: s for s in repo.statistics()}
    assert stats["pipeline"]["inference_count"] == 3
    assert stats["add_sub"]["inference_count"] == 6 and stats["mul"]["inference_count"] == 3


def test_ensemble_checks_its_requests_and_steps(ensemble_root, repo_factory):
    repo = repo_factory(ensemble_root)
    with pytest.raises(InvalidRequest, match="missing input 'B' for model 'pipeline'"):
        infer(repo, "pipeline", A=pair()[0])
    repo.unload("mul")
    with pytest.raises(ModelNotReady, match="ensemble 'pipeline' step 0 \\(model 'mul'\\)"):
        infer(repo, "pipeline", A=pair()[0], B=pair()[1])


def test_ensemble_with_a_dangling_tensor_is_unavailable(root, repo_factory):
    write_model(root, "dangling", ENSEMBLE_CONFIG.replace('name: "pipeline"', 'name: "dangling"')
                .replace('value: "diff" }\n      output_map { key: "Z"', 'value: "nowhere" }\n      output_map { key: "Z"'))
    repo = repo_factory(root)
    (entry,) = repo.index()
    assert entry["state"] == "UNAVAILABLE"
    assert "ensemble_scheduling.step[0].input_map: tensor 'nowhere'" in entry["reason"]


def test_independent_steps_run_concurrently(root, repo_factory):
    """Two steps that need only the ensemble's input each wait until both have started (bounded): they can
    both finish in order only if the ensemble started them together."""
    log = root / "windows.log"
    log.touch()
    step_config = f"""
    backend: "python"
    input [ {{ name: "X" data_type: TYPE_INT32 dims: [ 1 ] }} ]
    output [ {{ name: "Y" data_type: TYPE_INT32 dims: [ 1 ] }} ]
    parameters [ {{ key: "log" value: {{ string_value: "{log}" }} }},
                 {{ key: "wait_for" value: {{ string_value: "2" }} }} ]
    """
    for name in ("left", "right"):
        write_model(root, name, step_config, {"1/model.py": WINDOWS_MODEL})
    write_model(root, "fork", """
    platform: "ensemble"
    input [ { name: "X" data_type: TYPE_INT32 dims: [ 1 ] } ]
    output [ { name: "L" data_type: TYPE_INT32 dims: [ 1 ] }, { name: "R" data_type: TYPE_INT32 dims: [ 1 ] } ]
    ensemble_scheduling { step [
      { model_name: "left" input_map { key: "X" value: "X" } output_map { key: "Y" value: "L" } },
      { model_name: "right" input_map { key: "X" value: "X" } output_map { key: "Y" value: "R" } }
    ] }
    """)
    repo = repo_factory(root)
    out = infer(repo, "fork", X=np.array([4], np.int32)).outputs
    assert out["L"].tolist() == out["R"].tolist() == [4]
    events = log.read_text().split("\n")[:-1]
    assert [e.split()[0] for e in events] == ["start", "start", "end", "end"]
    assert {e.split()[1] for e in events} == {"left_0_0", "right_0_0"}
