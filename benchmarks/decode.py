"""Single-stream prefill and decode speed of deskpod against llama.cpp and transformers, in one run.

    bash benchmarks/setup_peers.sh            # once: the peers' own venv
    python benchmarks/decode.py               # SmolLM2 from the store, 2 threads

Every engine gets the same GGUF, the same content-free prompt ids, the same thread count and the same
method (one warm-up, then the median over --repeats of: prefill + first token, then --gen-tokens greedy
steps). Engines run one after another in rounds, so slow drifts of a shared machine hit all of them;
the ratios are the result, the absolute figures are this machine's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from client import PeerError, run_peer  # noqa: E402
from worker_common import speed_prompt_ids  # noqa: E402


def deskpod_once(lm, prompt: list[int], gen_tokens: int) -> tuple[float, float]:
    import torch

    from deskpod.engine.models.layers import KVCache

    cache = KVCache(lm.spec, len(prompt) + gen_tokens + 1)
    start = time.perf_counter()
    logits = lm.model(torch.tensor(prompt), torch.arange(len(prompt)), cache)
    token = int(logits[-1].argmax())
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(gen_tokens):
        logits = lm.model(torch.tensor([token]), torch.tensor([len(prompt) + i]), cache)
        token = int(logits[-1].argmax())
    return prefill, time.perf_counter() - start


def measure_deskpod(gguf: Path, args) -> dict:
    import torch

    from deskpod.engine.config import EngineConfig
    from deskpod.engine.loader import load_model

    torch.set_num_threads(args.threads)
    lm = load_model(gguf, EngineConfig(weights=args.weights, context=args.prompt_tokens + args.gen_tokens + 8))
    prompt = speed_prompt_ids(args.prompt_tokens, lm.spec.vocab_size)
    deskpod_once(lm, prompt[:16], 4)  # warm-up
    runs = [deskpod_once(lm, prompt, args.gen_tokens) for _ in range(args.repeats)]
    return {
        "prefill_tok_s": statistics.median(args.prompt_tokens / p for p, _ in runs),
        "decode_tok_s": statistics.median(args.gen_tokens / d for _, d in runs),
    }


def measure_peer(worker: str, gguf: Path, args) -> dict:
    return run_peer(worker, "speed", "--gguf", gguf, "--prompt-tokens", args.prompt_tokens,
                    "--gen-tokens", args.gen_tokens, "--threads", args.threads, "--repeats", args.repeats)


def store_gguf(name: str) -> Path:
    from deskpod.store import Store

    store = Store()
    return store.model_file(store.ensure(name))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None, help="a GGUF file (default: --model from the store)")
    parser.add_argument("--model", default="smollm2", help="a catalog model, pulled if need be (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="each engine is measured once per round")
    parser.add_argument("--weights", default="compact", choices=("compact", "float32"))
    parser.add_argument("--peers", default="llamacpp,transformers")
    args = parser.parse_args()
    gguf = args.gguf or store_gguf(args.model)
    engines = {"deskpod": lambda: measure_deskpod(gguf, args)}
    for peer in filter(None, args.peers.split(",")):
        engines[peer] = lambda peer=peer: measure_peer(peer, gguf, args)

    results: dict[str, list[dict]] = {name: [] for name in engines}
    for r in range(args.rounds):
        for name, measure in engines.items():
            try:
                results[name].append(measure())
            except PeerError as e:
                print(f"{name}: skipped ({str(e).splitlines()[0]})", file=sys.stderr)
            else:
                got = results[name][-1]
                print(f"round {r + 1} {name:13s} prefill {got['prefill_tok_s']:8.1f} tok/s  decode {got['decode_tok_s']:7.1f} tok/s", file=sys.stderr)

    summary = {name: {key: statistics.median(run[key] for run in runs) for key in ("prefill_tok_s", "decode_tok_s")}
               for name, runs in results.items() if runs}
    print(f"\n{gguf.name}: {args.prompt_tokens}-token prompt, {args.gen_tokens} generated tokens, {args.threads} threads, "
          f"median of {args.rounds} rounds x {args.repeats} repeats")
    print(f"{'engine':14s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'prefill ratio':>14s} {'decode ratio':>13s}")
    ours = summary["deskpod"]
    for name, s in summary.items():
        print(f"{name:14s} {s['prefill_tok_s']:14.1f} {s['decode_tok_s']:13.1f}"
              f" {ours['prefill_tok_s'] / s['prefill_tok_s']:13.2f}x {ours['decode_tok_s'] / s['decode_tok_s']:12.2f}x")
    print("(ratios are deskpod / engine: above 1 means deskpod is faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
