"""Check the peer workers against the recorded reference (shared/reference/smollm2-greedy.json).

Run from deskpod's venv once the peers' venv is built:

    python benchmarks/peers/check_reference.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf

For every recorded prompt: llama.cpp's prompt ids (chat template or raw) and greedy
completion must equal the recorded ones, and transformers' float32 greedy completion must
equal `transformers_fp32_completion_token_ids`. Exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from client import BENCHMARKS_DIR, run_peer

REFERENCE = BENCHMARKS_DIR.parent.parent / "shared" / "reference" / "smollm2-greedy.json"


def checks(result: dict[str, Any], gguf: str, max_tokens: int) -> dict[str, tuple[Any, Any]]:
    """For one recorded prompt: name -> (what the peer gave, what was recorded)."""
    chat = ["--chat"] if result["mode"] == "chat" else []
    prompt = run_peer("llamacpp", "tokenize", "--gguf", gguf, "--text", result["prompt"], *chat)
    greedy = ("greedy", "--gguf", gguf, "--prompt-ids", result["prompt_token_ids"], "--max-tokens", max_tokens)
    return {
        "llama.cpp rendered prompt": (prompt["rendered"], result["rendered_prompt"]),
        "llama.cpp prompt ids": (prompt["prompt_token_ids"], result["prompt_token_ids"]),
        "llama.cpp greedy ids": (run_peer("llamacpp", *greedy)["token_ids"], result["completion_token_ids"]),
        "transformers greedy ids": (
            run_peer("transformers", *greedy)["token_ids"],
            result["transformers_fp32_completion_token_ids"],
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    args = parser.parse_args()
    reference = json.loads(args.reference.read_text())
    max_tokens = reference["settings"]["max_new_tokens"]
    failed = 0
    for result in reference["results"]:
        for name, (got, want) in checks(result, args.gguf, max_tokens).items():
            same = got == want
            failed += not same
            print(f"{'ok  ' if same else 'DIFF'} {result['mode']:4} {result['prompt']!r}: {name}")
            if not same:
                print(f"       got  {json.dumps(got)}\n       want {json.dumps(want)}")
    print(f"{failed} mismatches" if failed else "all match")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
