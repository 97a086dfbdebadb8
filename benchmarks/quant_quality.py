"""What each low-precision scheme costs SmolLM2 in quality, and what it saves in memory, in one run.

    python benchmarks/quant_quality.py                 # SmolLM2 from the store (pulled if needed), 2 threads
    python benchmarks/quant_quality.py --json out.json

Rows: the GGUF as the engine runs it (Q4_1 blocks, Q8_0 embedding, deskpod's kernels), the same GGUF
expanded to float32 (the reference every scheme starts from: `deskpod quantize` dequantizes a GGUF
first), then `deskpod quantize --to SCHEME` of that GGUF for each scheme, loaded as `deskpod run` loads it.

- perplexity: exp(mean NLL of each next token) on tests/data/alice-chapters-1-2.txt (public domain), in
  windows of the engine's context (SmolLM2: 8192, so the whole ~5.5k-token text is one window): each
  window runs teacher-forced through the engine's forward pass in chunks of --chunk tokens over the KV
  cache, every token seeing all the tokens before it in its window.
- resident weights: bytes of the loaded model's buffers and parameters (less the RoPE table), in MB,
  and bits per weight over all weights and over the transformer blocks alone (embedding and head
  excluded: `deskpod quantize` keeps those at int8).
- decode tok/s: one stream, greedy, --gen-tokens steps after a 128-token prompt; median of --repeats rounds,
  each round timing every model once in turn (all of them loaded), so that a shared box's drift lands on every
  model alike, not on whichever was measured last.
- agreement with the original (the GGUF as the engine runs it), over the first 32 generated tokens of
  4 chat prompts: teacher-forced (at each of the original's 32 positions, is the scheme's argmax the
  same token) and free-running (greedy tokens identical from the start until the first difference).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "alice-chapters-1-2.txt"
SCHEMES = ("fp8", "nvfp4", "mxfp4", "int4", "int8")
PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain photosynthesis in one paragraph.",
    "List three uses of a paperclip.",
)
AGREEMENT_TOKENS = 32


# --- measurements ----------------------------------------------------------------------------------


def perplexity(lm, ids: list[int], window: int, chunk: int) -> float:
    """exp(mean NLL) over windows of `window` tokens, each run in chunks through one KV cache."""
    from deskpod.engine.models.layers import KVCache

    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        piece = torch.tensor(ids[start : start + window])
        cache = KVCache(lm.spec, len(piece))
        for c in range(0, len(piece) - 1, chunk):
            inputs, targets = piece[c : c + chunk], piece[c + 1 : c + chunk + 1]
            logits = lm.model(inputs, torch.arange(c, c + len(inputs)), cache, all_logits=True)[: len(targets)]
            nll += float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
            count += len(targets)
    return math.exp(nll / count)


def resident(lm, n_weights: int, n_block_weights: int) -> dict:
    def nbytes(module) -> int:
        tensors = {id(t): t for t in [*module.buffers(), *module.parameters()]}  # shared ones once
        return sum(t.numel() * t.element_size() for t in tensors.values())

    total = lm.weight_bytes()
    blocks = nbytes(lm.model.blocks)
    return {"resident_mb": total / 1e6, "bits_per_weight": 8 * total / n_weights,
            "block_bits_per_weight": 8 * blocks / n_block_weights}


def decode_rate(lm, prompt: list[int], gen_tokens: int) -> float:
    """Tokens/s of greedy single-stream decoding, --gen-tokens steps after `prompt`."""
    from deskpod.engine.models.layers import KVCache

    cache = KVCache(lm.spec, len(prompt) + gen_tokens + 1)
    token = int(lm.model(torch.tensor(prompt), torch.arange(len(prompt)), cache)[-1].argmax())
    start = time.perf_counter()
    for i in range(gen_tokens):
        token = int(lm.model(torch.tensor([token]), torch.tensor([len(prompt) + i]), cache)[-1].argmax())
    return gen_tokens / (time.perf_counter() - start)


def decode_speeds(models: dict, prompt: list[int], gen_tokens: int, repeats: int) -> dict[str, float]:
    """name -> median tokens/s over `repeats` rounds, each round every model once, in turn."""
    for lm in models.values():
        decode_rate(lm, prompt, 8)  # warm-up
    rates = {name: [] for name in models}
    for _ in range(repeats):
        for name, lm in models.items():
            rates[name].append(decode_rate(lm, prompt, gen_tokens))
    return {name: statistics.median(r) for name, r in rates.items()}


def greedy(lm, prompts: list[list[int]]) -> list[list[int]]:
    from deskpod.engine.generate import generate_batch
    from deskpod.engine.sampler import SamplingParams

    params = SamplingParams(max_tokens=AGREEMENT_TOKENS, temperature=0, ignore_eos=True)
    return [c.token_ids for c in generate_batch(lm, prompts, params)]


def agreement(lm, prompts: list[list[int]], original: list[list[int]]) -> dict:
    from deskpod.engine.models.layers import KVCache

    forced, free = [], []
    for prompt, ref, own in zip(prompts, original, greedy(lm, prompts)):
        ids = prompt + ref
        logits = lm.model(torch.tensor(ids), torch.arange(len(ids)), KVCache(lm.spec, len(ids)), all_logits=True)
        predicted = logits[len(prompt) - 1 : -1].argmax(-1).tolist()
        forced.append(sum(a == b for a, b in zip(predicted, ref)))
        free.append(next((i for i, (a, b) in enumerate(zip(own, ref)) if a != b), len(ref)))
    return {"teacher_forced": forced, "free_running": free}


# --- the run ---------------------------------------------------------------------------------------


def weight_counts(gguf_path: Path) -> tuple[int, int]:
    from deskpod.formats.gguf import GGUFFile

    tensors = list(GGUFFile(gguf_path).tensors())
    return sum(t.n_elements for t in tensors), sum(t.n_elements for t in tensors if t.name.startswith("blk."))


def measure(name: str, lm, args, ids, counts, prompts, original) -> dict:
    """Everything but the decode speed (decode_speeds, all models together)."""
    t = time.perf_counter()
    row = {"model": name, "perplexity": perplexity(lm, ids, min(args.window or lm.spec.max_context, lm.spec.max_context), args.chunk)}
    row |= resident(lm, *counts)
    row |= agreement(lm, prompts, original)
    print(f"  {name}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return row


def run(args) -> list[dict]:
    from deskpod.engine.config import EngineConfig
    from deskpod.engine.loader import load_model
    from deskpod.quant.convert import convert
    from deskpod.store import Store

    torch.set_num_threads(args.threads)
    store = Store()
    gguf = store.model_file(store.ensure(args.model))
    original = load_model(gguf)
    ids = original.tokenizer.encode(TEXT.read_text())[: args.text_tokens]
    print(f"{TEXT.name}: {len(ids)} tokens", file=sys.stderr)
    prompts = [original.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    reference = greedy(original, prompts)
    counts = weight_counts(gguf)
    models = {f"{args.model} GGUF (engine)": original, f"{args.model} float32": load_model(gguf, EngineConfig(weights="float32"))}
    with tempfile.TemporaryDirectory(prefix="quant-quality-") as tmp:
        for scheme in args.schemes.split(","):
            folder = Path(tmp) / scheme
            convert(gguf, folder, scheme, source_name=args.model)
            models[scheme] = load_model(folder)
    rows = [measure(name, lm, args, ids, counts, prompts, reference) for name, lm in models.items()]
    speeds = decode_speeds(models, ids[: args.prompt_tokens], args.gen_tokens, args.repeats)
    for row in rows:
        row["decode_tok_s"] = speeds[row["model"]]
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        ("| model | perplexity | resident MB | bits/weight (all) | bits/weight (blocks) | decode tok/s "
         "| agreement teacher-forced /32 | agreement free-running /32 |"),
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['perplexity']:.3f} | {r['resident_mb']:.1f} | {r['bits_per_weight']:.2f} "
            f"| {r['block_bits_per_weight']:.2f} | {r['decode_tok_s']:.1f} "
            f"| {' '.join(map(str, r['teacher_forced']))} | {' '.join(map(str, r['free_running']))} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="a GGUF Llama in the store (default: %(default)s)")
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--window", type=int, default=None, help="perplexity window (default: the engine's context)")
    parser.add_argument("--chunk", type=int, default=512, help="tokens per forward pass within a window")
    parser.add_argument("--text-tokens", type=int, default=None, help="score only the first N tokens (quick runs)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    rows = run(args)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"text": TEXT.name, "threads": args.threads, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
