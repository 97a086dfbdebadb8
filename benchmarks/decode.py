"""Single-stream prefill and decode speed of deskpod against llama.cpp and transformers, in one run.

    bash benchmarks/setup_peers.sh            # once: the peers' own venv
    python benchmarks/decode.py               # SmolLM2 from the store, 2 threads

Every engine gets the same GGUF, the same content-free prompt ids, the same thread count and the same
method (one warm-up, then the median over --repeats of: prefill + first token, then --gen-tokens greedy
steps). Engines run one after another in rounds, so slow drifts of a shared machine hit all of them;
the ratios are the result, the absolute figures are this machine's. The last column is each engine's decode
rate as a fraction of the roofline: the memory's read bandwidth (measured here, same threads) over the bytes a
token reads (deskpod's weights and the KV cache at the middle of the generation).
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


def deskpod_once(lm, prompt: list[int], gen_tokens: int, kv_dtype) -> tuple[float, float]:
    import torch

    from deskpod.engine.models.layers import KVCache

    cache = KVCache(lm.spec, len(prompt) + gen_tokens + 1, dtype=kv_dtype)
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
    from deskpod.engine.loader import kv_torch_dtype, load_model

    torch.set_num_threads(args.threads)
    config = EngineConfig(weights=args.weights, context=args.prompt_tokens + args.gen_tokens + 8,
                          kv_cache_dtype=args.kv_cache_dtype)
    lm = load_model(gguf, config)
    kv_dtype = kv_torch_dtype(config)  # what the engine keeps its KV cache in with these settings
    prompt = speed_prompt_ids(args.prompt_tokens, lm.spec.vocab_size)
    deskpod_once(lm, prompt[:16], 4, kv_dtype)  # warm-up
    runs = [deskpod_once(lm, prompt, args.gen_tokens, kv_dtype) for _ in range(args.repeats)]
    return {
        "prefill_tok_s": statistics.median(args.prompt_tokens / p for p, _ in runs),
        "decode_tok_s": statistics.median(args.gen_tokens / d for _, d in runs),
        "bytes_per_token": bytes_per_token(lm, args.prompt_tokens + args.gen_tokens // 2, kv_dtype.itemsize),
        "kv_cache_dtype": config.kv_dtype,
    }


def add_kv_cache_dtype_option(parser: argparse.ArgumentParser) -> None:
    """--kv-cache-dtype, as `deskpod serve` takes it (measure_deskpod reads it)."""
    from deskpod.engine.config import KV_CACHE_DTYPES

    parser.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                        help="deskpod's KV cache (default: %(default)s, as `deskpod serve`)")


def bytes_per_token(lm, context: int, kv_bytes: int) -> int:
    """What one decode step must read at least: every weight deskpod holds (the tied embedding is the LM head, read
    whole) and the keys and values of `context` tokens (`kv_bytes` each)."""
    weights = sum(t.numel() * t.element_size() for t in [*lm.model.buffers(), *lm.model.parameters()])
    spec = lm.spec
    return weights + 2 * spec.num_layers * context * spec.num_kv_heads * spec.head_dim * kv_bytes


def read_bandwidth(threads: int, megabytes: int = 1024, repeats: int = 5) -> float:
    """Bytes/s this machine reads from memory with `threads` threads: the best of `repeats` sums over a buffer far
    larger than the caches (a sum's arithmetic is far below the memory's pace)."""
    import torch

    torch.set_num_threads(threads)
    buffer = torch.ones(megabytes * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best


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
    add_kv_cache_dtype_option(parser)
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
    ours = summary["deskpod"]
    # the roofline: decode can be no faster than the memory delivers the bytes a token reads
    bandwidth = read_bandwidth(args.threads)
    per_token = statistics.median(run["bytes_per_token"] for run in results["deskpod"])
    roofline = bandwidth / per_token
    print(f"{'engine':14s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'prefill ratio':>14s} {'decode ratio':>13s} {'of roofline':>12s}")
    for name, s in summary.items():
        print(f"{name:14s} {s['prefill_tok_s']:14.1f} {s['decode_tok_s']:13.1f}"
              f" {ours['prefill_tok_s'] / s['prefill_tok_s']:13.2f}x {ours['decode_tok_s'] / s['decode_tok_s']:12.2f}x"
              f" {s['decode_tok_s'] / roofline:11.0%}")
    print("(ratios are deskpod / engine: above 1 means deskpod is faster)")
    print(f"roofline: {bandwidth / 1e9:.1f} GB/s read with {args.threads} threads / "
          f"{per_token / 1e6:.1f} MB a token "
          f"(deskpod's weights and {results['deskpod'][0]['kv_cache_dtype']} keys and values) = {roofline:.0f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
