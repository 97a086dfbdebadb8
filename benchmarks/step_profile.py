"""Where a decode step's time goes: py-spy samples the engine decoding one stream, grouped by what runs.

    pip install py-spy                          # in deskpod's venv
    python benchmarks/step_profile.py           # SmolLM2, 1 thread, contexts of 128 and 1024 tokens

Per context: the step time measured without the profiler, then the share of py-spy's samples (native frames
included, 200 Hz) in each group, and that share of the step in milliseconds. Only the decode loop is counted
(the prompt's prefill runs in a function of its own, left out). Groups, by the innermost frame:

- integer matmul kernels: deskpod's GGUF block kernels (ggml_blocks.cpp), the weights' products
- activation rounding: activations rounded to int8 per 32 before them
- attention kernel: paged decode attention (cpu_ops.cpp)
- other native code: ATen's small ops (adds, copies, norms' pieces, RoPE's, the sampler's), the dispatcher
- Python: the interpreter running deskpod's model code, the engine (scheduler, runner, sampler, text), torch's
  Python layers (Module.__call__ and such)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

GROUPS = [  # (group, predicate on the innermost frame)
    ("integer matmul kernels", lambda f: "deskpod_ggml_blocks" in f and "quantize_rows" not in f),
    ("activation rounding", lambda f: "quantize_rows" in f),
    ("attention kernel", lambda f: "attend_piece" in f or "paged_decode_attention" in f),
    ("Python: deskpod's model code", lambda f: ".py" in f and ("deskpod/engine/models" in f or "deskpod/quant" in f)),
    ("Python: engine, scheduler, sampler", lambda f: ".py" in f and "deskpod/" in f),
    ("Python: torch's layers", lambda f: ".py" in f),
    ("other native code (ATen ops, dispatcher)", lambda f: True),
]


def child(args) -> None:
    """Decode one stream: prefill() then decode_loop(), which alone is counted; prints the decode step time."""
    import torch

    from deskpod.engine.config import EngineConfig
    from deskpod.engine.engine import LLMEngine
    from deskpod.engine.llm import LLM
    from deskpod.engine.sampler import SamplingParams

    torch.set_num_threads(args.threads)
    llm = LLM(args.model)
    engine = LLMEngine(llm.loaded, EngineConfig(kv_cache_gb=0.2, context=args.context + args.tokens + 8))
    prompt = [(i * 7919) % (llm.loaded.spec.vocab_size - 200) + 100 for i in range(args.context)]

    def prefill() -> None:
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True))
        while not any(out.token_ids for out in engine.step()):
            pass

    def decode_loop() -> float:
        start, steps = time.perf_counter(), 0
        while engine.has_work():
            engine.step()
            steps += 1
        return (time.perf_counter() - start) / steps

    for _ in range(args.repeats):
        engine.scheduler.pool.forget_cached()
        prefill()
        print(f"{decode_loop() * 1e3:.3f}", flush=True)


def run_child(args, context: int, profile: Path | None) -> list[float]:
    command = [sys.executable, __file__, "--child", "--model", args.model, "--context", str(context), "--threads",
               str(args.threads), "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
    if profile is not None:
        command = ["py-spy", "record", "--native", "-r", "200", "-f", "raw", "-o", str(profile), "--", *command]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return [float(line) for line in done.stdout.splitlines() if line.strip() and not line.startswith("py-spy>")]


def breakdown(profile: Path) -> Counter:
    groups: Counter = Counter()
    for line in profile.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not any("decode_loop (" in f for f in frames):
            continue
        leaf = frames[-1]
        groups[next(name for name, matches in GROUPS if matches(leaf))] += int(count)
    return groups


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--contexts", default="128,1024", help="prompt lengths (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=200, help="decode steps per repeat (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--context", type=int, default=128, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    if shutil.which("py-spy") is None:
        sys.exit("py-spy is not installed: pip install py-spy")
    for context in (int(c) for c in args.contexts.split(",")):
        step_ms = sorted(run_child(args, context, None))[args.repeats // 2]
        with tempfile.TemporaryDirectory() as folder:
            profile = Path(folder) / "profile.txt"
            run_child(args, context, profile)
            groups = breakdown(profile)
        total = sum(groups.values())
        print(f"\n{args.model}, {context}-token context, {args.threads} thread(s): {step_ms:.2f} ms a decode step "
              f"(median of {args.repeats}, no profiler); {total} samples")
        for name, _ in GROUPS:
            share = groups[name] / total
            print(f"  {name:<42} {share:6.1%} {share * step_ms:7.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
