"""Robots driving a stateful policy: N simulated robots, each sending its latest observation at a fixed rate to
the GRU policy of examples/robot_policy (its recurrent state kept by deskpod's sequence batcher, one sequence
per robot), and waiting for the action before its next tick.

    python benchmarks/robots.py                       # 4 robots at 100 Hz for 60 s: gRPC streams, then shm
    python benchmarks/robots.py --seconds 10 --robots 8 --hz 50

Two transports, same run, same server:
  - gRPC streams (ModelStreamInfer, tritonclient's start_stream), one per robot;
  - system shared memory: each robot's observation and action in its own registered regions, one unary gRPC
    call per tick naming them (no tensor bytes on the socket).
Reports per transport: ticks, latency (send to action) p50 / p99 / max, and missed deadlines — actions that
came after the robot's next tick was due (latency > the period). Everything runs on 127.0.0.1; the server is
stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from llama_server import free_port, stop_process  # noqa: E402 - the benchmarks' shared process helpers


def example():
    path = Path(__file__).parents[1] / "examples" / "robot_policy" / "make_repository.py"
    spec = importlib.util.spec_from_file_location("make_repository", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def server(root: Path):
    import tritonclient.grpc as grpcclient

    grpc_port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "deskpod.cli", "serve", "--model-repository", str(root),
                                "--port", str(free_port()), "--grpc-port", str(grpc_port), "--no-access-log"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"127.0.0.1:{grpc_port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                client = grpcclient.InferenceServerClient(url)
                if client.is_model_ready("gru_policy"):
                    client.close()
                    break
            time.sleep(0.3)
        yield url
    finally:
        stop_process(process, grace=15)


def robot_stream(url: str, robot: int, period: float, seconds: float, size: int, latencies: list) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    done: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: done.put((time.perf_counter(), error)))
    rng = np.random.default_rng(robot)
    next_tick, end, first = time.perf_counter(), time.perf_counter() + seconds, True
    try:
        while next_tick < end:
            time.sleep(max(0.0, next_tick - time.perf_counter()))
            obs = grpcclient.InferInput("OBS__0", [1, size], "FP32")
            obs.set_data_from_numpy(rng.standard_normal((1, size)).astype(np.float32))
            sent = time.perf_counter()
            client.async_stream_infer("gru_policy", [obs], sequence_id=robot, sequence_start=first)
            first = False
            received, error = done.get(timeout=10)
            if error is not None:
                raise RuntimeError(f"robot {robot}: {error}")
            latencies.append(received - sent)
            next_tick += period
    finally:
        client.stop_stream()
        client.close()


def robot_shm(url: str, robot: int, period: float, seconds: float, size: int, actions: int, latencies: list) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.utils.shared_memory as shm

    client = grpcclient.InferenceServerClient(url)
    keys = (f"/dp_robot_{os.getpid()}_{robot}_obs", f"/dp_robot_{os.getpid()}_{robot}_act")
    obs_region = shm.create_shared_memory_region(f"obs{robot}", keys[0], 4 * size)
    act_region = shm.create_shared_memory_region(f"act{robot}", keys[1], 4 * actions)
    client.register_system_shared_memory(f"obs{robot}", keys[0], 4 * size)
    client.register_system_shared_memory(f"act{robot}", keys[1], 4 * actions)
    rng = np.random.default_rng(robot)
    obs = grpcclient.InferInput("OBS__0", [1, size], "FP32")
    obs.set_shared_memory(f"obs{robot}", 4 * size)
    action = grpcclient.InferRequestedOutput("ACTION__0")
    action.set_shared_memory(f"act{robot}", 4 * actions)
    next_tick, end, first = time.perf_counter(), time.perf_counter() + seconds, True
    try:
        while next_tick < end:
            time.sleep(max(0.0, next_tick - time.perf_counter()))
            sent = time.perf_counter()
            shm.set_shared_memory_region(obs_region, [rng.standard_normal((1, size)).astype(np.float32)])
            client.infer("gru_policy", [obs], outputs=[action], sequence_id=10_000 + robot, sequence_start=first)
            shm.get_contents_as_numpy(act_region, np.float32, [1, actions])
            latencies.append(time.perf_counter() - sent)
            first = False
            next_tick += period
    finally:
        client.unregister_system_shared_memory(f"obs{robot}")
        client.unregister_system_shared_memory(f"act{robot}")
        shm.destroy_shared_memory_region(obs_region)
        shm.destroy_shared_memory_region(act_region)
        client.close()


def run(kind: str, url: str, args, module) -> dict:
    period = 1 / args.hz
    per_robot: list[list[float]] = [[] for _ in range(args.robots)]
    errors: list[BaseException] = []

    def robot(i: int) -> None:
        try:
            if kind == "grpc stream":
                robot_stream(url, i + 1, period, args.seconds, module.OBSERVATION, per_robot[i])
            else:
                robot_shm(url, i + 1, period, args.seconds, module.OBSERVATION, module.ACTION, per_robot[i])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=robot, args=(i,)) for i in range(args.robots)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    latencies = sorted(x for r in per_robot for x in r)
    missed = sum(x > period for x in latencies)
    return {"ticks": len(latencies), "p50": statistics.median(latencies) * 1e3,
            "p99": latencies[int(0.99 * (len(latencies) - 1))] * 1e3, "max": latencies[-1] * 1e3,
            "missed": missed, "missed_pct": 100 * missed / len(latencies)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--robots", type=int, default=4)
    parser.add_argument("--hz", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    module = example()
    with tempfile.TemporaryDirectory(prefix="deskpod-robots-") as root:
        module.write(Path(root))
        with server(Path(root)) as url:
            results = {kind: run(kind, url, args, module) for kind in ("grpc stream", "shared memory")}
    print(f"\n{args.robots} robots at {args.hz:g} Hz for {args.seconds:g} s (deadline {1000 / args.hz:.1f} ms), "
          f"GRU policy {module.OBSERVATION}->{module.HIDDEN}->{module.ACTION}, state on the server")
    print(f"{'transport':<16}{'ticks':>8}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}{'missed':>12}")
    for kind, r in results.items():
        print(f"{kind:<16}{r['ticks']:>8}{r['p50']:>10.2f}{r['p99']:>10.2f}{r['max']:>10.2f}"
              f"{r['missed']:>6} ({r['missed_pct']:.2f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
