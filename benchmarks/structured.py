"""What structured outputs cost per token: decode speed with each kind of constraint against the same
prompts unconstrained, through the engine (one stream, greedy), in one run.

    python benchmarks/structured.py                       # SmolLM2 from the store, 2 threads
    python benchmarks/structured.py --model qwen2.5-coder-0.5b --json out.json

Each row runs the same chat prompts; decode tok/s = generated tokens / time from the first token to the
last (prefill excluded: it is the same with and without a constraint), median over --repeats. The
constraint's own cost per token (llguidance's mask and the token's consumption, measured around them) is
reported beside, with the compile time of the grammar. The constrained rows end when the grammar does; the
free row runs to the same mean length (ignore_eos) so that both decode over the same context lengths.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from deskpod.engine.llm import LLM
from deskpod.engine.sampler import SamplingParams, StructuredOutput
from deskpod.engine.structured import GrammarConstraint, StructuredOutputs

PROMPTS = [
    "Reply with a JSON object with a single key city.",
    "Describe a book as JSON: title, author, year.",
    "Give me a phone number.",
    "Is the sky blue? Answer yes or no.",
]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string", "maxLength": 40}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                            "maxItems": 3}},
    "required": ["name", "age", "email", "tags"], "additionalProperties": False}
KINDS = {
    "json_schema": StructuredOutput("json_schema", json.dumps(PERSON)),
    "json_object": StructuredOutput("json_object"),
    "regex": StructuredOutput("regex", r"\(\d{3}\) \d{3}-\d{4}"),
    "choice": StructuredOutput("choice", json.dumps(["yes", "no", "it depends"])),
}


class Timed(GrammarConstraint):
    """The constraint, with the time spent in it."""

    spent = 0.0

    def mask(self, vocab_size: int):
        start = time.perf_counter()
        try:
            return super().mask(vocab_size)
        finally:
            Timed.spent += time.perf_counter() - start

    def accept(self, token: int) -> None:
        start = time.perf_counter()
        try:
            super().accept(token)
        finally:
            Timed.spent += time.perf_counter() - start


def decode(llm: LLM, ids: list[int], params: SamplingParams) -> tuple[int, float]:
    """(tokens after the first, seconds they took)."""
    stamps = []
    engine = _engine(llm, ids, params)
    while engine.has_work():
        for out in engine.step():
            stamps += [time.perf_counter()] * len(out.token_ids)
    return len(stamps) - 1, stamps[-1] - stamps[0]


def _engine(llm: LLM, ids: list[int], params: SamplingParams):
    from dataclasses import replace

    from deskpod.engine.engine import LLMEngine

    config = replace(llm.config, max_num_seqs=1, max_waiting=1)
    blocks = -(-(len(ids) + params.max_tokens + 1) // config.block_size)
    engine = LLMEngine(llm.loaded, config, num_blocks=blocks)
    constraint = None
    if params.structured:
        built = engine.structured.constraint(params.structured)
        constraint = Timed(built.matcher, len(built._bits) * 32)
    engine.add_request(ids, params, "0", constraint=constraint)
    return engine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model)
    prompts = [llm.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS]
    structured = StructuredOutputs(llm.tokenizer, llm.loaded.spec.vocab_size)
    start = time.perf_counter()
    structured.constraint(KINDS["json_object"])
    tokenizer_s = time.perf_counter() - start

    rows, lengths = {}, []
    for kind, spec in KINDS.items():
        compile_s = min(_timed(lambda: structured.constraint(spec)) for _ in range(5))
        runs = []
        for _ in range(args.repeats):
            Timed.spent = 0.0
            tokens, seconds = map(sum, zip(*(decode(llm, ids, SamplingParams(temperature=0, max_tokens=args.max_tokens,
                                                                                  structured=spec)) for ids in prompts)))
            runs.append((tokens, seconds, Timed.spent))
        tokens = runs[0][0]
        lengths.append(tokens / len(prompts))
        rows[kind] = {"tokens": tokens, "decode_tok_s": statistics.median(t / s for t, s, _ in runs),
                      "constraint_us_per_token": statistics.median(c / t * 1e6 for t, _, c in runs),
                      "compile_ms": compile_s * 1e3}
    free_tokens = max(2, round(statistics.mean(lengths)))
    runs = []
    for _ in range(args.repeats):
        tokens, seconds = map(sum, zip(*(decode(llm, ids, SamplingParams(temperature=0, max_tokens=free_tokens, ignore_eos=True))
                                         for ids in prompts)))
        runs.append(tokens / seconds)
    rows = {"unconstrained": {"tokens": free_tokens * len(prompts), "decode_tok_s": statistics.median(runs)}, **rows}

    print(f"{args.model}: {len(prompts)} prompts, greedy, {args.threads} threads, median of {args.repeats}; "
          f"llguidance tokenizer built in {tokenizer_s * 1e3:.0f} ms")
    print(f"{'':14}{'decode tok/s':>14}{'vs free':>9}{'constraint us/token':>21}{'compile ms':>12}{'tokens':>8}")
    free = rows["unconstrained"]["decode_tok_s"]
    for kind, row in rows.items():
        extra = f"{row['constraint_us_per_token']:21.0f}{row['compile_ms']:12.1f}" if "compile_ms" in row else " " * 33
        print(f"{kind:14}{row['decode_tok_s']:14.1f}{row['decode_tok_s'] / free:8.2f}x{extra}{row['tokens']:8d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "threads": args.threads, "tokenizer_ms": tokenizer_s * 1e3, "rows": rows}, f, indent=1)
    return 0


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    raise SystemExit(main())
