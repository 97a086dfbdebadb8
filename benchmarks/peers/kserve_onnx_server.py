"""KServe's Python ModelServer serving one ONNX model with onnxruntime, written the way KServe's docs
write a custom predictor: a kserve.Model whose load() opens an InferenceSession and whose predict()
runs it on the request's input. Run with the KServe venv's python (benchmarks/setup_kserve.sh):

    benchmarks/.venv-kserve/bin/python benchmarks/peers/kserve_onnx_server.py MODEL.onnx --name cnn --port 8080

KServe's REST server binds 0.0.0.0 with no option to change it; this launcher makes it bind 127.0.0.1
(uvicorn.Config's host), and turns its gRPC server off: the benchmark speaks v2 over HTTP.
"""

from __future__ import annotations

import argparse

import uvicorn

_Config = uvicorn.Config


class LoopbackConfig(_Config):
    def __init__(self, *args, **kwargs):
        kwargs["host"] = "127.0.0.1"
        super().__init__(*args, **kwargs)


uvicorn.Config = LoopbackConfig  # before kserve builds its REST server

import kserve
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse
from kserve.utils.utils import generate_uuid


class OnnxModel(kserve.Model):
    def __init__(self, name: str, path: str, threads: int = 0):
        super().__init__(name)
        self.path = path
        self.threads = threads
        self.load()

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads  # 0: onnxruntime's default, one per core
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers: dict | None = None) -> InferResponse:
        feeds = {i.name: i.as_numpy() for i in payload.inputs}
        results = self.session.run(self.output_names, feeds)
        outputs = []
        for name, array in zip(self.output_names, results):
            out = InferOutput(name=name, shape=list(array.shape), datatype="FP32")
            out.set_data_from_numpy(array, binary_data=payload.use_binary_outputs)
            outputs.append(out)
        return InferResponse(model_name=self.name, infer_outputs=outputs, response_id=payload.id or generate_uuid())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--name", default="cnn")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: one per core)")
    args = parser.parse_args()
    model = OnnxModel(args.name, args.model, args.threads)
    kserve.ModelServer(http_port=args.port, enable_grpc=False, enable_latency_logging=False).start([model])


if __name__ == "__main__":
    main()
