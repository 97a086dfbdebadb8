"""Linked boxes against one box, on one machine: two `deskpod` processes of one CPU thread each (`serve
--nodes 2` and `join`, over loopback) against one `deskpod serve` of one thread, the same model, same run.

    python benchmarks/link.py                      # SmolLM2 from the store
    python benchmarks/link.py --model qwen2.5-coder-0.5b --tokens 64

Reports, each the median of --repeats runs:
  - single-stream decode tokens/s (a 128-token streamed reply, prefill excluded): one box, tensor parallel,
    pipeline parallel;
  - aggregate output tokens/s of 8 concurrent streams (64 tokens each): one box, pipeline, tensor;
  - the link's cost per step, from the head's /metrics: seconds waiting on tensor-parallel partial sums
    (deskpod_link_wait_seconds{kind="exchange"}) and on pipeline hand-offs ({kind="handoff"}) per step;
  - with root, the same across two network namespaces, and with 1 ms of netem delay where the kernel has it.

Targets (issue "Two boxes, one model"): tensor parallel single-stream decode >= 1.5x one box; pipeline
aggregate at 8 streams >= 1.6x. Every process started here is stopped at the end (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from llama_server import free_port, stop_process  # noqa: E402 - the benchmarks' shared process helpers

TOKEN = "benchmark-link-token"


@dataclass
class Served:
    url: str
    processes: list[subprocess.Popen]


def deskpod(*args: str, home: str | None = None) -> subprocess.Popen:
    env = {**os.environ, **({"DESKPOD_HOME": home} if home else {})}
    return subprocess.Popen([sys.executable, "-m", "deskpod.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def serving(model: str, parallel: str | None, worker_home: str) -> Iterator[Served]:
    http = free_port()
    args = ["serve", model, "--threads", "1", "--port", str(http), "--no-access-log"]
    processes = []
    if parallel:
        endpoint = f"127.0.0.1:{free_port()}"
        args += ["--nodes", "2", "--link", endpoint, "--link-token", TOKEN, "--parallel", parallel]
        processes.append(deskpod(*args))
        processes.append(deskpod("join", endpoint, "--link-token", TOKEN, "--threads", "1", home=worker_home))
    else:
        processes.append(deskpod(*args))
    url = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in processes):
                raise RuntimeError("a deskpod process exited:\n" + "\n".join(p.stderr.read()[-2000:] for p in processes
                                                                              if p.poll() is not None))
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.3)
        yield Served(url, processes)
    finally:
        for p in processes:
            stop_process(p, grace=15)


def decode_rate(url: str, model: str, tokens: int) -> float:
    """Tokens/s between the first and the last streamed token of one reply."""
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": tokens, "stream": True, "ignore_eos": True,
            "temperature": 0}
    times = []
    with httpx.Client(timeout=600) as client, client.stream("POST", url + "/v1/completions", json=body) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: {") and '"text"' in line:
                times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0])


def aggregate_rate(url: str, model: str, streams: int, tokens: int) -> float:
    async def run() -> float:
        async with httpx.AsyncClient(timeout=600) as client:
            async def one(i: int) -> int:
                body = {"model": model, "prompt": f"Story {i}: once upon a time", "max_tokens": tokens,
                        "ignore_eos": True, "temperature": 0}
                reply = await client.post(url + "/v1/completions", json=body)
                return reply.json()["usage"]["completion_tokens"]

            started = time.perf_counter()
            done = sum(await asyncio.gather(*(one(i) for i in range(streams))))
            return done / (time.perf_counter() - started)

    return asyncio.run(run())


def link_waits(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith(("deskpod_link_wait_seconds_total", "deskpod_link_steps_total")):
            name, value = line.rsplit(" ", 1)
            key = "steps" if "steps" in name else name.split('kind="')[1].split('"')[0]
            values[key] = float(value)
    return values


def measure(model: str, parallel: str | None, args, worker_home: str) -> dict[str, float]:
    with serving(model, parallel, worker_home) as served:
        decode_rate(served.url, model, 8)  # warm-up
        aggregate_rate(served.url, model, args.streams, 8)
        before = link_waits(served.url)
        decode = statistics.median(decode_rate(served.url, model, args.tokens) for _ in range(args.repeats))
        after = link_waits(served.url)
        aggregate = statistics.median(aggregate_rate(served.url, model, args.streams, args.stream_tokens)
                                      for _ in range(args.repeats))
    result = {"decode": decode, "aggregate": aggregate}
    steps = after.get("steps", 0) - before.get("steps", 0)
    if steps:
        for kind in ("exchange", "handoff"):
            result[f"{kind}_ms_per_step"] = 1000 * (after.get(kind, 0) - before.get(kind, 0)) / steps
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=128, help="single-stream reply length")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--stream-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from deskpod.store import Store

    store = Store()
    store.ensure(args.model, progress=False)
    with contextlib.ExitStack() as stack:
        import tempfile

        worker_home = stack.enter_context(tempfile.TemporaryDirectory(prefix="deskpod-worker-"))
        print(f"pulling {args.model} into the second box's store ({worker_home})", file=sys.stderr)
        Store(worker_home).ensure(args.model, progress=False)
        results = {}
        for label, parallel in (("one box", None), ("tensor parallel", "tensor"), ("pipeline parallel", "pipeline")):
            print(f"measuring {label}...", file=sys.stderr)
            results[label] = measure(args.model, parallel, args, worker_home)

    one = results["one box"]
    print(f"\n{args.model}, one CPU thread per box, median of {args.repeats}")
    print(f"{'':<20}{'decode tok/s':>14}{'ratio':>8}{f'{args.streams} streams tok/s':>20}{'ratio':>8}"
          f"{'link ms/step':>16}")
    for label, r in results.items():
        link = r.get("exchange_ms_per_step", 0) + r.get("handoff_ms_per_step", 0)
        print(f"{label:<20}{r['decode']:>14.1f}{r['decode'] / one['decode']:>7.2f}x{r['aggregate']:>20.1f}"
              f"{r['aggregate'] / one['aggregate']:>7.2f}x{(f'{link:.2f}' if label != 'one box' else '-'):>16}")
    tp, pp = results["tensor parallel"], results["pipeline parallel"]
    print(f"\ntensor parallel decode {tp['decode'] / one['decode']:.2f}x (target >= 1.5x); "
          f"pipeline {args.streams}-stream aggregate {pp['aggregate'] / one['aggregate']:.2f}x (target >= 1.6x)")
    print(f"link per step: tensor {tp.get('exchange_ms_per_step', 0):.2f} ms in partial sums; pipeline "
          f"{pp.get('handoff_ms_per_step', 0):.2f} ms waiting on hand-offs (loopback, 0 ms added delay)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
