"""deskpod on the real models of the catalog, against llama.cpp and transformers in the same run.

    bash benchmarks/setup_peers.sh                         # once: the peers' own venv
    python benchmarks/real_models.py                       # gemma3-270m and qwen2.5-coder-0.5b (pulled if need be)
    python benchmarks/real_models.py --models smollm2 --skip speed,memory

For each model (a store model; its GGUF is what every engine reads):
  tokens     prompt ids against llama.cpp's (its own completion / chat-completion path) on PROMPTS: code,
             Korean, Japanese, emoji, accents, markup, spacing; raw, and through the chat template where the
             model has one. Target: identical on every prompt.
  logits     deskpod with float32 weights against transformers' GGUF loader (float32, offline) on a few
             prompts: largest |difference| and the difference's norm over the logits' norm.
  agreement  deskpod's compact kernels, teacher-forced on llama.cpp's own greedy continuation (32 tokens a
             prompt): how often deskpod's next token is llama.cpp's. Target >= 95%.
  speed      prefill and single-stream decode tokens/s, deskpod (compact) and llama.cpp, same GGUF and
             threads, measured in rounds (benchmarks/decode.py). Target: decode >= 0.8x llama.cpp.
  memory     `deskpod plan`'s resident memory against the peak RSS of deskpod running the model in a fresh
             process (benchmarks/plan_accuracy.py). Target: within 15%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE))
import decode  # noqa: E402
from client import run_peer  # noqa: E402

PROMPTS = [
    "The capital of France is",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "서울은 대한민국의 수도입니다. 서울의 인구는",
    "日本の首都は東京です。富士山の高さは",
    "I love pizza 🍕 and tacos 🌮! What about you? 😀👍",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
    "Ünïcödé tëxt wïth àccents: café, naïve, Zürich, Ångström.",
    "   leading spaces,\ttabs\tand\n\n\nblank lines   ",
    "1234567890 + 98765 = ? Answer: 1,333,655.",
    "<html><body><p class=\"x\">Hello, world!</p></body></html>",
    "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;",
    "Explain photosynthesis to a ten-year-old.",
]
LOGIT_PROMPTS = 3  # transformers reloads the model for each one: a few are enough for the figure
GREEDY_TOKENS = 32


def deskpod_models(name: str, kv_cache_dtype: str = "auto"):
    """The model compact (with this KV cache) and expanded to float32 (float32 throughout: the reference)."""
    from deskpod.engine.llm import LLM

    return LLM(name, weights="compact", kv_cache_dtype=kv_cache_dtype), LLM(name, weights="float32")


def prompt_ids(llm, text: str, chat: bool) -> list[int]:
    return llm.chat_prompt([{"role": "user", "content": text}]) if chat else llm.prompt_ids(text)


def all_logits(llm, ids: list[int]) -> np.ndarray:
    """Every position's logits, with the KV cache the engine keeps for this model (float16 for compact weights)."""
    from deskpod.engine.loader import kv_torch_dtype
    from deskpod.engine.models.layers import KVCache
    import torch

    lm = llm.loaded
    cache = KVCache(lm.spec, len(ids), dtype=kv_torch_dtype(llm.config))
    return lm.model(torch.tensor(ids), torch.arange(len(ids)), cache, all_logits=True).numpy()


def tokens_part(compact, gguf: Path, modes: list[bool]) -> dict:
    rows = []
    for chat in modes:
        for text in PROMPTS:
            ours = prompt_ids(compact, text, chat)
            theirs = run_peer("llamacpp", "tokenize", "--gguf", gguf, "--text", text, *(["--chat"] if chat else []))
            rows.append({"prompt": text, "chat": chat, "equal": ours == theirs["prompt_token_ids"],
                         "tokens": len(ours)})
    return {"identical": sum(r["equal"] for r in rows), "prompts": len(rows),
            "differing": [(r["prompt"], r["chat"]) for r in rows if not r["equal"]]}


def logits_part(exact, gguf: Path, chat: bool, threads: int) -> dict:
    diffs, rels = [], []
    for text in PROMPTS[:LOGIT_PROMPTS]:
        ids = prompt_ids(exact, text, chat)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "logits.npy"
            run_peer("transformers", "logits", "--gguf", gguf, "--ids", ids, "--out", out, "--threads", threads)
            theirs = np.load(out)
        ours = all_logits(exact, ids)[:, : theirs.shape[1]]  # a GGUF's vocabulary may be padded past the tokenizer's
        diffs.append(float(np.abs(ours - theirs).max()))
        rels.append(float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)))
    return {"max_abs_diff": max(diffs), "relative_diff": max(rels), "prompts": LOGIT_PROMPTS}


def agreement_part(compact, gguf: Path, modes: list[bool]) -> dict:
    agree = total = 0
    for chat in modes:
        for text in PROMPTS:
            ids = prompt_ids(compact, text, chat)
            theirs = run_peer("llamacpp", "greedy", "--gguf", gguf, "--prompt-ids", ids, "--max-tokens", GREEDY_TOKENS)["token_ids"]
            ours = all_logits(compact, ids + theirs)[len(ids) - 1 : -1].argmax(-1).tolist()
            agree += sum(a == b for a, b in zip(ours, theirs))
            total += len(theirs)
    return {"agreement": agree / total, "positions": total}


def speed_part(gguf: Path, args) -> dict:
    options = argparse.Namespace(threads=args.threads, prompt_tokens=128, gen_tokens=64, repeats=3, weights="compact",
                                 kv_cache_dtype=args.kv_cache_dtype)
    runs = {"deskpod": [], "llama.cpp": []}
    for _ in range(args.rounds):
        runs["deskpod"].append(decode.measure_deskpod(gguf, options))
        runs["llama.cpp"].append(decode.measure_peer("llamacpp", gguf, options))
    median = {k: {m: statistics.median(r[m] for r in v) for m in ("prefill_tok_s", "decode_tok_s")} for k, v in runs.items()}
    return {**median, "decode_ratio": median["deskpod"]["decode_tok_s"] / median["llama.cpp"]["decode_tok_s"],
            "prefill_ratio": median["deskpod"]["prefill_tok_s"] / median["llama.cpp"]["prefill_tok_s"]}


def memory_part(gguf: Path) -> dict:
    done = subprocess.run([sys.executable, str(HERE / "plan_accuracy.py"), "--gguf", str(gguf), "--json", "--local-only"],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    local = json.loads(done.stdout)["this_machine"]
    return {"predicted_bytes": local["predicted"]["resident_bytes"], "measured_bytes": local["measured"]["peak_rss_bytes"],
            "ratio": local.get("memory_ratio")}


def run_model(name: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    compact, exact = deskpod_models(name, args.kv_cache_dtype)
    gguf = compact.loaded.path
    modes = [False] + ([True] if compact.tokenizer.has_chat_template else [])
    parts = {
        "tokens": lambda: tokens_part(compact, gguf, modes),
        "logits": lambda: logits_part(exact, gguf, modes[-1], args.threads),
        "agreement": lambda: agreement_part(compact, gguf, modes),
        "speed": lambda: speed_part(gguf, args),
        "memory": lambda: memory_part(gguf),
    }
    result = {"model": name, "gguf": str(gguf)}
    for part, measure in parts.items():
        if part not in args.skip:
            print(f"{name}: {part}...", file=sys.stderr, flush=True)
            result[part] = measure()
    return result


def report(results: list[dict]) -> None:
    for r in results:
        print(f"\n{r['model']} ({Path(r['gguf']).name})")
        if t := r.get("tokens"):
            print(f"  prompt ids identical to llama.cpp: {t['identical']}/{t['prompts']}"
                  + (f"  differing: {t['differing']}" if t["differing"] else ""))
        if g := r.get("logits"):
            print(f"  float32 logits vs transformers: max |diff| {g['max_abs_diff']:.2e}, relative {g['relative_diff']:.2e}")
        if a := r.get("agreement"):
            print(f"  teacher-forced agreement with llama.cpp (compact): {a['agreement']:.1%} of {a['positions']} tokens")
        if s := r.get("speed"):
            d, ll = s["deskpod"], s["llama.cpp"]
            print(f"  decode  tok/s: deskpod {d['decode_tok_s']:.1f}, llama.cpp {ll['decode_tok_s']:.1f}  ({s['decode_ratio']:.2f}x)")
            print(f"  prefill tok/s: deskpod {d['prefill_tok_s']:.1f}, llama.cpp {ll['prefill_tok_s']:.1f}  ({s['prefill_ratio']:.2f}x)")
        if m := r.get("memory"):
            if "error" in m:
                print(f"  memory: {m['error']}")
            else:
                print(f"  resident memory: planned {m['predicted_bytes'] / 1e6:.0f} MB, measured {m['measured_bytes'] / 1e6:.0f} MB"
                      f" (planned / measured {m['ratio']:.2f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gemma3-270m,qwen2.5-coder-0.5b", help="catalog or store models, comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="speed rounds per engine")
    parser.add_argument("--skip", default="", help="parts to leave out: tokens,logits,agreement,speed,memory")
    parser.add_argument("--json", action="store_true")
    decode.add_kv_cache_dtype_option(parser)
    args = parser.parse_args()
    args.skip = set(filter(None, args.skip.split(",")))
    results = [run_model(name, args) for name in args.models.split(",")]
    print(json.dumps(results, indent=2)) if args.json else report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
