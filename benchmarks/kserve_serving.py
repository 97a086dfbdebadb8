"""Serving one ONNX model three ways in the same run: deskpod, KServe's Python ModelServer, and plain
in-process onnxruntime. One command, from deskpod's venv (KServe lives in its own venv: run
benchmarks/setup_kserve.sh once):

    python benchmarks/kserve_serving.py                       # concurrency 1, 8, 32; 10 s each
    python benchmarks/kserve_serving.py --concurrency 32 --seconds 20 --engines deskpod,onnxruntime

The model is a small CNN built here with onnx.helper (seeded weights): [N,3,64,64] FP32 -> three 3x3
convolutions with ReLU (96, 192, 384 channels; strides 1, 2, 2; 0.7 GFLOP per image, about 2-3 ms of
one core here) -> global average pool -> a 10-way linear layer. Each request carries one image. A model
this size is where serving is about the model and not only about HTTP: with much lighter ones (try
--channels 32,64,128) every Python server's own per-request cost, and the client's on the same box,
dominate, and no server comes near in-process onnxruntime.

- deskpod: `deskpod serve --model-repository` on a repository holding that model, gRPC off, configured
  as a Triton user would for a 2-core CPU: dynamic batching (max_batch_size 4: this model runs fastest
  per image in small batches, its activations stay in cache; no queue delay: requests that arrive while
  the instance is busy are batched, a lone request is not held back), one instance whose onnxruntime
  session uses every core (two single-threaded instances measured slower here: their convolutions
  fight over the shared cache), no access log.
- kserve: KServe's ModelServer with a kserve.Model whose predict() runs an onnxruntime session with its
  default threads (see benchmarks/peers/kserve_onnx_server.py; --kserve-threads 1 gives it one thread
  instead), bound to 127.0.0.1.
- onnxruntime: the same model in this process with a default session, N threads each calling
  session.run on one image.

Both servers get exactly the same requests from the same client: one asyncio loop of aiohttp (what
tritonclient.http.aio runs on) with N concurrent requests, each sent as soon as the previous one
answered; the body is the one the official tritonclient builds, tensors in the binary tensor data
extension both ways (both servers accept it). Every server's output is checked against onnxruntime's
once before timing, parsed by tritonclient. Per level: a warm-up, then requests/s over the timed window
and the p50/p99 of per-request latency (client-side, request sent -> whole response read).

Servers are started for their own measurement only and stopped after it (also on Ctrl-C or an error);
everything listens on 127.0.0.1. Results are printed as a table and written to
benchmarks/results/kserve_serving.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import onnx
import onnxruntime as ort
import tritonclient.http as httpclient
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
KSERVE_PYTHON = HERE / ".venv-kserve" / "bin" / "python"
KSERVE_SERVER = HERE / "peers" / "kserve_onnx_server.py"
RESULTS = HERE / "results" / "kserve_serving.json"
MODEL = "cnn"
SHAPE = (1, 3, 64, 64)
CHANNELS = (96, 192, 384)
ENGINES = ("deskpod", "kserve", "onnxruntime")
STARTUP_TIMEOUT_S = 120
HEADER_LENGTH = "Inference-Header-Content-Length"

REPOSITORY_CONFIG = """
name: "cnn"
backend: "onnxruntime"
max_batch_size: 4
input [ { name: "image" data_type: TYPE_FP32 dims: [ 3, 64, 64 ] } ]
output [ { name: "logits" data_type: TYPE_FP32 dims: [ 10 ] } ]
dynamic_batching { max_queue_delay_microseconds: 0 }
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


# --- the model ----------------------------------------------------------------------------------


def build_cnn(path: Path, channels: tuple[int, ...] = CHANNELS, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    nodes, weights, previous, width = [], [], "image", SHAPE[1]
    for i, (out, stride) in enumerate(zip(channels, (1, 2, 2))):
        w = (rng.standard_normal((out, width, 3, 3)) * np.sqrt(2 / (width * 9))).astype(np.float32)
        weights += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(out, np.float32), f"b{i}")]
        nodes += [
            helper.make_node("Conv", [previous, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1], strides=[stride] * 2),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
        ]
        previous, width = f"r{i}", out
    fc = (rng.standard_normal((10, width)) * 0.1).astype(np.float32)
    weights += [numpy_helper.from_array(fc, "fc_w"), numpy_helper.from_array(np.zeros(10, np.float32), "fc_b")]
    nodes += [
        helper.make_node("GlobalAveragePool", [previous], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", *SHAPE[1:]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_repository(root: Path, channels: tuple[int, ...] = CHANNELS) -> Path:
    (root / MODEL).mkdir(parents=True)
    (root / MODEL / "config.pbtxt").write_text(REPOSITORY_CONFIG)
    return build_cnn(root / MODEL / "1" / "model.onnx", channels)


# --- results ------------------------------------------------------------------------------------


@dataclass
class Level:
    engine: str
    concurrency: int
    requests: int
    seconds: float
    failures: int
    latencies_ms: list[float]

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def summary(self) -> dict:
        return {
            "engine": self.engine,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "failures": self.failures,
            "throughput_rps": round(self.throughput, 1),
            "p50_ms": round(self.percentile(50), 2),
            "p99_ms": round(self.percentile(99), 2),
        }


# --- servers ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        time.sleep(0.2)
    raise RuntimeError(f"the server was not ready in {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def server(cmd: list[str], port: int, log: Path) -> Iterator[str]:
    with log.open("w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}/v2/models/{MODEL}/ready", process, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def deskpod_cmd(root: Path, port: int) -> list[str]:
    return [
        *(sys.executable, "-m", "deskpod.server.cli", "--model-repository", str(root)),
        *("--port", str(port), "--no-grpc", "--no-access-log"),
    ]


def kserve_cmd(model: Path, port: int, threads: int) -> list[str]:
    if not KSERVE_PYTHON.exists():
        raise SystemExit(f"no KServe venv at {KSERVE_PYTHON.parent.parent}: run benchmarks/setup_kserve.sh first")
    return [str(KSERVE_PYTHON), str(KSERVE_SERVER), str(model), "--name", MODEL, "--port", str(port), "--threads", str(threads)]


# --- the client ---------------------------------------------------------------------------------


def request_body(image: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """The v2 request tritonclient builds for one image, binary tensor data extension (its own encoder)."""
    tensor = httpclient.InferInput("image", list(image.shape), "FP32")
    tensor.set_data_from_numpy(image, binary_data=True)
    body, header_length = httpclient.InferenceServerClient.generate_request_body(
        [tensor], outputs=[httpclient.InferRequestedOutput("logits", binary_data=True)]
    )
    return body, {HEADER_LENGTH: str(header_length)}


async def post(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]) -> bytes:
    async with session.post(url, data=body, headers=headers) as response:
        content = await response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {content[:200]!r}")
        return content


async def check_output(url: str, image: np.ndarray, want: np.ndarray) -> None:
    body, headers = request_body(image)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v2/models/{MODEL}/infer", data=body, headers=headers) as response:
            content = await response.read()
            length = response.headers.get(HEADER_LENGTH)
    result = httpclient.InferenceServerClient.parse_response_body(
        content, header_length=int(length) if length else None
    )
    np.testing.assert_allclose(result.as_numpy("logits"), want, rtol=1e-4, atol=1e-5, err_msg=f"{url} differs")


async def drive(url: str, engine: str, image: np.ndarray, concurrency: int, warmup: float, seconds: float) -> Level:
    """`concurrency` clients in one loop, each sending its next request when the previous one answered;
    only requests that start and end inside the timed window count. The request body is built once (the
    same image every time), so the client spends its time on HTTP, the same for every server."""
    body, headers = request_body(image)
    endpoint = f"{url}/v2/models/{MODEL}/infer"
    start = time.perf_counter() + warmup
    stop = start + seconds
    latencies: list[float] = []
    failures = 0

    async def one_client(session: aiohttp.ClientSession) -> None:
        nonlocal failures
        while (now := time.perf_counter()) < stop:
            try:
                await post(session, endpoint, body, headers)
            except (aiohttp.ClientError, RuntimeError):
                failures += 1
                continue
            end = time.perf_counter()
            if now >= start and end <= stop:
                latencies.append((end - now) * 1000)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(one_client(session) for _ in range(concurrency)))
    return Level(engine, concurrency, len(latencies), seconds, failures, latencies)


def measure_server(url: str, engine: str, image: np.ndarray, want: np.ndarray, levels: list[int], args) -> list[Level]:
    asyncio.run(check_output(url, image, want))
    return [asyncio.run(drive(url, engine, image, c, args.warmup, args.seconds)) for c in levels]


# --- in-process onnxruntime ---------------------------------------------------------------------


def measure_in_process(model: Path, image: np.ndarray, levels: list[int], args) -> list[Level]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    results = []
    for concurrency in levels:
        start = time.perf_counter() + args.warmup
        stop = start + args.seconds
        latencies: list[list[float]] = [[] for _ in range(concurrency)]

        def worker(mine: list[float], start: float = start, stop: float = stop) -> None:
            while (now := time.perf_counter()) < stop:
                session.run(["logits"], {"image": image})
                end = time.perf_counter()
                if now >= start and end <= stop:
                    mine.append((end - now) * 1000)

        threads = [threading.Thread(target=worker, args=(mine,)) for mine in latencies]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        flat = [x for mine in latencies for x in mine]
        results.append(Level("onnxruntime", concurrency, len(flat), args.seconds, 0, flat))
    return results


# --- report -------------------------------------------------------------------------------------


def table(levels: list[Level]) -> str:
    rows = [f"{'concurrency':>11}  {'engine':<12} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'failed':>6}"]
    by_level: dict[int, dict[str, Level]] = {}
    for level in levels:
        by_level.setdefault(level.concurrency, {})[level.engine] = level
    for concurrency, engines in sorted(by_level.items()):
        for engine, lv in engines.items():
            rows.append(
                f"{concurrency:>11}  {engine:<12} {lv.throughput:>8.1f} {lv.percentile(50):>8.2f} "
                f"{lv.percentile(99):>8.2f} {lv.failures:>6}"
            )
        ratios = []
        if "deskpod" in engines and "kserve" in engines:
            d, k = engines["deskpod"], engines["kserve"]
            ratios.append(f"deskpod/kserve {d.throughput / k.throughput:.2f}x req/s, p99 {d.percentile(99) / k.percentile(99):.2f}x")
        if "deskpod" in engines and "onnxruntime" in engines:
            ratios.append(f"deskpod/onnxruntime {engines['deskpod'].throughput / engines['onnxruntime'].throughput:.2f}x req/s")
        if ratios:
            rows.append(f"{'':>13}" + "; ".join(ratios))
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated levels (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed window per level (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=2.0, help="untimed start of each level (default: %(default)s)")
    parser.add_argument("--engines", default=",".join(ENGINES), help="subset of %(default)s")
    parser.add_argument(
        "--channels", default=",".join(map(str, CHANNELS)), help="the three convolutions' widths (default: %(default)s)"
    )
    parser.add_argument(
        "--kserve-threads", type=int, default=0, help="KServe's onnxruntime intra-op threads (default: 0, one per core)"
    )
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    engines = [e for e in args.engines.split(",") if e]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engine(s) {', '.join(sorted(unknown))}; choose from {', '.join(ENGINES)}")

    image = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    results: list[Level] = []
    with tempfile.TemporaryDirectory(prefix="kserve-bench-") as tmp:
        channels = tuple(int(c) for c in args.channels.split(","))
        model = build_repository(Path(tmp) / "repository", channels)
        want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"image": image})[0]
        print(f"model: CNN {SHAPE} -> 10, channels {channels}; load average {os.getloadavg()[0]:.2f}", flush=True)
        for engine in engines:
            port = free_port()
            print(f"{engine} ...", flush=True)
            if engine == "onnxruntime":
                results += measure_in_process(model, image, levels, args)
                continue
            cmd = deskpod_cmd(model.parents[2], port) if engine == "deskpod" else kserve_cmd(model, port, args.kserve_threads)
            with server(cmd, port, Path(tmp) / f"{engine}.log") as url:
                results += measure_server(url, engine, image, want, levels, args)
    print(table(results))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"levels": [lv.summary() for lv in results], "load_average": os.getloadavg()}, indent=2))
    print(f"written to {RESULTS.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
