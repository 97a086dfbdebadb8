"""Speculative decoding by prompt lookup: deskpod with and without it, llama.cpp with and without it, one run.

    bash benchmarks/setup_peers.sh                  # once: the peers' own venv
    python benchmarks/speculative.py                # SmolLM2 from the store, 2 threads, 3 repeats
    python benchmarks/speculative.py --model qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b   # and a draft model

Two workloads where a reply repeats its prompt: code editing (a function and an instruction to change it; the
reply is mostly the function again) and summarising (a passage of Alice in Wonderland, tests/data). Every prompt
goes through the model's chat template, and the same ids go to every engine, answered greedily up to
--max-tokens. Per reply: seconds to the first token, then tokens/s from it to the last (the decode rate this
measures); per workload the median over prompts of each prompt's median over --repeats, and the speed-up
against the same engine without speculation. deskpod's replies with and without it must be identical token
for token (the run fails otherwise); llama.cpp's are compared too.

--streams 1,4,8,16: deskpod alone under load instead, that many requests at once (both workloads' prompts in
turn), aggregate output tokens/s from the first prompt's arrival to the last token, with and without guesses.

deskpod: `SpeculativeConfig(num_speculative_tokens=K, prompt_lookup_max=4, prompt_lookup_min=2)` (--guesses K);
llama.cpp: llama-cpp-python's `LlamaPromptLookupDecoding(num_pred_tokens=2)` (--peer-guesses), the value its
documentation advises for CPU-only machines (10 for GPUs), n-grams of up to 2 tokens.

--draft MODEL adds deskpod with a draft model (`SpeculativeConfig(method="draft_model", model=MODEL,
num_speculative_tokens=--draft-guesses)`): a smaller model with the same tokenizer guesses; its replies must be
identical too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from client import PeerError, run_peer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# three functions to change, shared with the tests (tests/data/code-samples.json)
CODE = list(json.loads((ROOT / "tests" / "data" / "code-samples.json").read_text()).values())
EDITS = [
    "Rename the variable `lines` to `rows` in this function and give the whole function back:\n\n",
    "Add a docstring to every method of this class and give the whole class back:\n\n",
    "Add type hints to this function and give the whole function back:\n\n",
]


def workloads() -> dict[str, list[str]]:
    alice = (ROOT / "tests" / "data" / "alice-chapters-1-2.txt").read_text().split("\n\n")
    paragraphs = [" ".join(p.split()) for p in alice if len(p) > 400]
    passages = [" ".join(paragraphs[i : i + 3]) for i in (0, 6)]
    return {
        "code editing": [edit + code for edit, code in zip(EDITS, CODE)],
        "summarising": [passage + "\n\nSummarize the text above in a few sentences." for passage in passages],
    }


def deskpod_replies(lm, prompts: list[list[int]], args, speculative) -> list[dict]:
    from deskpod.engine.config import EngineConfig
    from deskpod.engine.engine import LLMEngine
    from deskpod.engine.sampler import SamplingParams

    engine = LLMEngine(lm, EngineConfig(context=2048, kv_cache_gb=0.2, speculative=speculative))
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)

    def one(ids: list[int]) -> tuple[list[int], float, float, int]:
        engine.scheduler.pool.forget_cached()  # every repeat computes its prompt, as llama.cpp's reset does
        tokens, start, first, steps = [], time.perf_counter(), None, 0
        engine.add_request(ids, params)
        while engine.has_work():
            steps += 1
            for out in engine.step():
                tokens += out.token_ids
                first = first or time.perf_counter()
        return tokens, first - start, time.perf_counter() - first, steps

    one(prompts[0][:16])  # warm-up
    replies = []
    for ids in prompts:
        runs = [one(ids) for _ in range(args.repeats)]
        replies.append({"token_ids": runs[0][0], "first_token_s": statistics.median(r[1] for r in runs),
                        "rest_s": statistics.median(r[2] for r in runs), "steps": runs[0][3]})
        if any(r[0] != runs[0][0] for r in runs):
            raise SystemExit("deskpod's greedy replies differ between repeats")
    stats = engine.stats()
    for reply in replies:
        reply["acceptance"] = stats.accepted_tokens_total / stats.draft_tokens_total if stats.draft_tokens_total else None
    return replies


def llamacpp_replies(gguf: Path, prompts: list[list[int]], args, guesses: int) -> list[dict]:
    return [run_peer("llamacpp", "timed-greedy", "--gguf", str(gguf), "--prompt-ids", ids, "--max-tokens",
                     args.max_tokens, "--prompt-lookup", guesses, "--repeats", args.repeats, "--threads", args.threads)
            for ids in prompts]


def under_load(lm, args) -> int:
    """Aggregate output tokens/s of N requests at once, with and without guesses, for each N of --streams."""
    from deskpod.engine.config import EngineConfig, SpeculativeConfig
    from deskpod.engine.engine import LLMEngine
    from deskpod.engine.sampler import SamplingParams

    texts = [t for texts in workloads().values() for t in texts]
    print(f"{'streams':>7} {'deskpod tok/s':>14} {'+ lookup':>9} {'ratio':>6}")
    for streams in (int(n) for n in args.streams.split(",")):
        prompts = [lm.tokenizer.apply_chat_template([{"role": "user", "content": texts[i % len(texts)]}]) for i in range(streams)]
        rates = []
        for speculative in (None, SpeculativeConfig(num_speculative_tokens=args.guesses)):
            engine = LLMEngine(lm, EngineConfig(kv_cache_gb=0.5, context=2048, speculative=speculative))
            runs = []
            for _ in range(args.repeats):
                engine.scheduler.pool.forget_cached()
                for ids in prompts:
                    engine.add_request(ids, SamplingParams(temperature=0, max_tokens=args.max_tokens))
                tokens, start = 0, time.perf_counter()
                while engine.has_work():
                    tokens += sum(len(out.token_ids) for out in engine.step())
                runs.append(tokens / (time.perf_counter() - start))
            rates.append(statistics.median(runs))
        print(f"{streams:>7} {rates[0]:>14.1f} {rates[1]:>9.1f} {rates[1] / rates[0]:>5.2f}x", flush=True)
    return 0


def rate(reply: dict) -> float:
    return (len(reply["token_ids"]) - 1) / reply["rest_s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="a store model (GGUF) or a .gguf file (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--guesses", type=int, default=4, help="deskpod's num_speculative_tokens (default: %(default)s)")
    parser.add_argument("--peer-guesses", type=int, default=2, help="llama.cpp's num_pred_tokens (default: %(default)s)")
    parser.add_argument("--skip-peers", action="store_true", help="deskpod alone")
    parser.add_argument("--draft", default=None, help="also deskpod with this draft model (same tokenizer as --model)")
    parser.add_argument("--draft-guesses", type=int, default=4, help="the draft model's num_speculative_tokens (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--streams", default=None, help="deskpod under load instead: request counts, e.g. 1,4,8,16")
    args = parser.parse_args()

    import torch

    from deskpod.engine.config import EngineConfig, SpeculativeConfig
    from deskpod.engine.llm import resolve_model_file
    from deskpod.engine.loader import load_model

    torch.set_num_threads(args.threads)
    gguf = resolve_model_file(args.model, progress=True)
    lm = load_model(gguf, EngineConfig(context=2048))  # once: every engine of the run shares its weights
    if args.streams:
        return under_load(lm, args)
    results: dict[str, dict] = {}
    failed = False
    for workload, texts in workloads().items():
        prompts = [lm.tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
        runs = {"deskpod": deskpod_replies(lm, prompts, args, None),
                "deskpod + lookup": deskpod_replies(lm, prompts, args, SpeculativeConfig(num_speculative_tokens=args.guesses))}
        if args.draft:
            draft = SpeculativeConfig(method="draft_model", model=args.draft, num_speculative_tokens=args.draft_guesses)
            runs["deskpod + draft"] = deskpod_replies(lm, prompts, args, draft)
        if not args.skip_peers:
            try:
                runs["llama.cpp"] = llamacpp_replies(gguf, prompts, args, 0)
                runs["llama.cpp + lookup"] = llamacpp_replies(gguf, prompts, args, args.peer_guesses)
            except PeerError as e:
                print(f"llama.cpp skipped: {e}", file=sys.stderr)
        same = [a["token_ids"] == b["token_ids"] for a, b in zip(runs["deskpod"], runs["deskpod + lookup"])]
        same_draft = ([a["token_ids"] == b["token_ids"] for a, b in zip(runs["deskpod"], runs["deskpod + draft"])]
                      if args.draft else [])
        failed |= not all(same + same_draft)
        rates = {engine: statistics.median(rate(r) for r in replies) for engine, replies in runs.items()}
        results[workload] = {
            "prompt_tokens": [len(p) for p in prompts],
            "reply_tokens": [len(r["token_ids"]) for r in runs["deskpod"]],
            "decode_tok_s": rates,
            "first_token_s": {e: statistics.median(r["first_token_s"] for r in replies) for e, replies in runs.items()},
            "deskpod_identical_with_lookup": same,
            "deskpod_acceptance": runs["deskpod + lookup"][0]["acceptance"],
            "deskpod_steps": [[r["steps"] for r in runs[e]] for e in ("deskpod", "deskpod + lookup")],
        }
        if args.draft:
            results[workload] |= {"deskpod_identical_with_draft": same_draft,
                                  "deskpod_draft_acceptance": runs["deskpod + draft"][0]["acceptance"],
                                  "deskpod_draft_steps": [r["steps"] for r in runs["deskpod + draft"]]}
        if "llama.cpp + lookup" in runs:
            results[workload]["llamacpp_identical_with_lookup"] = [
                a["token_ids"] == b["token_ids"] for a, b in zip(runs["llama.cpp"], runs["llama.cpp + lookup"])]
            results[workload]["llamacpp_vs_deskpod_replies_identical"] = [
                a["token_ids"] == b["token_ids"] for a, b in zip(runs["llama.cpp"], runs["deskpod"])]

    print(f"\n{args.model}, greedy, up to {args.max_tokens} tokens, {args.threads} threads, median of {args.repeats}")
    print(f"{'workload':<14} {'engine':<20} {'decode tok/s':>12} {'speed-up':>9} {'vs llama.cpp':>13} {'vs llama.cpp + lookup':>22}")
    for workload, r in results.items():
        rates = r["decode_tok_s"]
        for engine, value in rates.items():
            base = rates[engine.removesuffix(" + lookup").removesuffix(" + draft")]
            versus = [f"{value / rates[p]:.2f}x" if p in rates and engine.startswith("deskpod") else "" for p in ("llama.cpp", "llama.cpp + lookup")]
            print(f"{workload:<14} {engine:<20} {value:>12.1f} {value / base:>8.2f}x {versus[0]:>13} {versus[1]:>22}")
        print(f"{'':<14} deskpod: acceptance {r['deskpod_acceptance']:.0%}, steps {r['deskpod_steps'][0]} -> "
              f"{r['deskpod_steps'][1]}, replies identical with lookup: {all(r['deskpod_identical_with_lookup'])}")
        if args.draft:
            print(f"{'':<14} deskpod + draft ({args.draft}): acceptance {r['deskpod_draft_acceptance']:.0%}, steps "
                  f"{r['deskpod_draft_steps']}, replies identical: {all(r['deskpod_identical_with_draft'])}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if failed:
        print("FAILED: deskpod's replies changed with speculative decoding", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
