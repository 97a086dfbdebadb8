"""What a Python model's own process costs per request: an echo model (its input returned as its output) through
deskpod's repository as a Python model, which runs in its own process, its tensors crossing through shared
memory; beside it the same echo as an ONNX Identity model, run in the server's process by onnxruntime, through
the same repository path (validation, batcher) — the difference is the process boundary's cost.

    python benchmarks/python_process.py               # 16 B, 64 KiB, 1 MiB and 16 MiB tensors, 300 calls each
    python benchmarks/python_process.py --calls 1000

Reports per tensor size the median time of one call both ways (and the Python model's p99), and the difference:
the cost of the process boundary (the messages, the copies in and out, the thread hand-offs) per request.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ECHO = """
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("B", pb_utils.get_input_tensor_by_name(r, "A").as_numpy())])
                for r in requests]
"""
CONFIG = """
backend: "python"
input [ { name: "A" data_type: TYPE_UINT8 dims: [ -1 ] } ]
output [ { name: "B" data_type: TYPE_UINT8 dims: [ -1 ] } ]
"""
SIZES = {"16 B": 16, "64 KiB": 64 << 10, "1 MiB": 1 << 20, "16 MiB": 16 << 20}


def write_identity_onnx(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["A"], ["B"])], "echo",
                              [helper.make_tensor_value_info("A", TensorProto.UINT8, ["n"])],
                              [helper.make_tensor_value_info("B", TensorProto.UINT8, ["n"])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def timed(call, value: np.ndarray, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        out = call(value)
        times.append(time.perf_counter() - start)
        assert out.nbytes == value.nbytes
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    from deskpod.backends import InferRequest, ModelRepository

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "echo" / "1").mkdir(parents=True)
        (root / "echo" / "config.pbtxt").write_text(CONFIG)
        (root / "echo" / "1" / "model.py").write_text(ECHO)
        (root / "echo_onnx" / "1").mkdir(parents=True)
        (root / "echo_onnx" / "config.pbtxt").write_text(CONFIG.replace('"python"', '"onnxruntime"'))
        write_identity_onnx(root / "echo_onnx" / "1" / "model.onnx")
        repository = ModelRepository(root)
        repository.load_all()
        loop = asyncio.new_event_loop()

        def caller(model: str):
            def call(value: np.ndarray) -> np.ndarray:
                return loop.run_until_complete(repository.infer(InferRequest(model, {"A": value}))).outputs["B"]
            return call

        print(f"{'tensor':>8} | {'onnxruntime p50':>15} | {'python p50':>10} | {'p99':>8} | boundary per request")
        try:
            for label, size in SIZES.items():
                value = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
                calls = max(args.calls // (16 if size >= 16 << 20 else 1), 10)
                for model in ("echo", "echo_onnx"):
                    timed(caller(model), value, 5)  # warm-up
                own = timed(caller("echo"), value, calls)
                base = timed(caller("echo_onnx"), value, calls)
                p50, p50_base = statistics.median(own), statistics.median(base)
                p99 = sorted(own)[int(0.99 * (len(own) - 1))]
                print(f"{label:>8} | {p50_base * 1e6:12.0f} µs | {p50 * 1e6:7.0f} µs | {p99 * 1e6:5.0f} µs | "
                      f"{(p50 - p50_base) * 1e6:.0f} µs")
        finally:
            repository.close()
            tasks = asyncio.all_tasks(loop)  # the batchers' dispatchers
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()


if __name__ == "__main__":
    main()
