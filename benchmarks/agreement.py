"""deskpod's outputs against two engines nobody here wrote, live, on the same GGUF.

    bash benchmarks/setup_peers.sh      # once
    python benchmarks/agreement.py      # SmolLM2 from the store; --gguf PATH for another file

For each prompt (chat template applied):
  transformers (float32, dequantizing the GGUF): prompt ids, logits of deskpod's float32 mode
      (max abs difference, allclose), greedy tokens identical;
  llama.cpp: prompt ids identical; teacher-forced next-token agreement of deskpod's compact mode on
      llama.cpp's own greedy continuation; how long the free-running greedy sequences stay identical
      (llama.cpp rounds activations to 8 bits, so they part at near-ties).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from client import run_peer  # noqa: E402

from deskpod.engine.generate import generate  # noqa: E402
from deskpod.engine.llm import LLM  # noqa: E402
from deskpod.engine.models.llama import KVCache  # noqa: E402
from deskpod.engine.sampler import SamplingParams  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the ocean.",
    "Explain photosynthesis to a ten-year-old.",
    "List three prime numbers and say why they are prime.",
    "What is 17 times 23?",
    "Translate 'good morning' into Spanish, French and German.",
]


def all_logits(llm: LLM, ids: list[int]) -> np.ndarray:
    lm = llm.loaded
    return lm.model(torch.tensor(ids), torch.arange(len(ids)), KVCache(lm.config, len(ids)), all_logits=True).numpy()


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = str(args.gguf) if args.gguf else "smollm2"
    compact, exact = LLM(model, weights="compact"), LLM(model, weights="float32")
    gguf = compact.loaded.path
    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    totals = {"ids_llama": 0, "ids_hf": 0, "hf_greedy": 0, "agree": 0, "positions": 0, "max_diff": 0.0}
    print(f"{'prompt':42s} {'ids=llama.cpp':>13s} {'ids=HF':>7s} {'max|dlogit| vs HF':>18s} {'greedy=HF':>10s} "
          f"{'teacher-forced vs llama.cpp':>28s} {'free-run common':>16s}")
    for text in PROMPTS:
        ids = compact.chat_prompt([{"role": "user", "content": text}])
        llama_ids = run_peer("llamacpp", "tokenize", "--gguf", gguf, "--text", text, "--chat")["prompt_token_ids"]
        hf_ids = run_peer("transformers", "tokenize", "--gguf", gguf, "--text", text, "--chat")["prompt_token_ids"]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "logits.npy"
            run_peer("transformers", "logits", "--gguf", gguf, "--ids", ids, "--out", out, "--threads", args.threads)
            hf_logits = np.load(out)
        diff = float(np.abs(all_logits(exact, ids) - hf_logits).max())
        ours_exact = generate(exact.loaded, ids, greedy).token_ids
        hf_greedy = run_peer("transformers", "greedy", "--gguf", gguf, "--prompt-ids", ids, "--max-tokens", args.max_tokens)["token_ids"]
        llama_greedy = run_peer("llamacpp", "greedy", "--gguf", gguf, "--prompt-ids", ids, "--max-tokens", args.max_tokens)["token_ids"]
        forced = all_logits(compact, ids + llama_greedy)[len(ids) - 1 : -1].argmax(-1).tolist()
        agree = sum(a == b for a, b in zip(forced, llama_greedy))
        ours_compact = generate(compact.loaded, ids, greedy).token_ids
        hf_match = ours_exact == [t for t in hf_greedy if t not in exact.tokenizer.eog_ids]
        totals["ids_llama"] += ids == llama_ids
        totals["ids_hf"] += ids == hf_ids
        totals["hf_greedy"] += hf_match
        totals["agree"] += agree
        totals["positions"] += len(llama_greedy)
        totals["max_diff"] = max(totals["max_diff"], diff)
        print(f"{text[:42]:42s} {str(ids == llama_ids):>13s} {str(ids == hf_ids):>7s} {diff:18.2e} {str(hf_match):>10s} "
              f"{f'{agree}/{len(llama_greedy)}':>28s} {common_prefix(ours_compact, llama_greedy):>9d}/{len(llama_greedy)}")
    n = len(PROMPTS)
    print(f"\nprompt ids identical: llama.cpp {totals['ids_llama']}/{n}, transformers {totals['ids_hf']}/{n}")
    print(f"float32 logits vs transformers: max |difference| {totals['max_diff']:.2e}; greedy identical {totals['hf_greedy']}/{n}")
    print(f"teacher-forced agreement with llama.cpp: {totals['agree']}/{totals['positions']} "
          f"= {100 * totals['agree'] / totals['positions']:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
