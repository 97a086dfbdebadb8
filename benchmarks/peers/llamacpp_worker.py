"""llama.cpp, through llama-cpp-python, as a peer: prompt ids, greedy ids, argmaxes, speed.

Runs in benchmarks/.venv-peers (bash benchmarks/setup_peers.sh), never in deskpod's venv:

    benchmarks/.venv-peers/bin/python benchmarks/peers/llamacpp_worker.py \
        greedy --gguf MODEL.gguf --prompt-ids '[504, 3575, 282, 4649, 314]' --max-tokens 32

Every command prints one JSON object on stdout (llama.cpp's own logging goes to stderr).
"""

from __future__ import annotations

import argparse
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import Llama
from worker_common import Stopwatch, main, median_rate, speed_prompt_ids

N_CTX = 2048  # as in the reference runs (shared/reference/smollm2-greedy.json)


def load(args: argparse.Namespace, logits_all: bool = False) -> Llama:
    return Llama(
        model_path=args.gguf,
        n_ctx=N_CTX,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        logits_all=logits_all,
        verbose=False,
    )


class _PromptBuilt(Exception):
    """Stops a completion call once its prompt ids are built, before any evaluation."""


def completion_prompt(llama: Llama, text: str, chat: bool) -> dict[str, Any]:
    """The text and ids that create_(chat_)completion would evaluate for `text`.

    Runs llama-cpp-python's own path (for chat: the handler it picked, which for a GGUF with
    `tokenizer.chat_template` renders that template with add_generation_prompt=True), spying on
    `tokenize` for the rendered text and stopping at `generate`, which receives the final ids.
    """
    seen: dict[str, Any] = {}
    tokenize = llama.tokenize

    def spy_tokenize(data: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        seen.update(rendered=data.decode("utf-8"), tokenize_add_bos=add_bos, special=special)
        return tokenize(data, add_bos=add_bos, special=special)

    def stop_at_generate(tokens: list[int], **_: Any) -> None:
        seen["prompt_token_ids"] = list(tokens)
        raise _PromptBuilt

    llama.tokenize, llama.generate = spy_tokenize, stop_at_generate  # type: ignore[method-assign]
    try:
        if chat:
            llama.create_chat_completion(messages=[{"role": "user", "content": text}], max_tokens=1)
        else:
            llama.create_completion(text, max_tokens=1)
    except _PromptBuilt:
        pass
    finally:
        del llama.tokenize, llama.generate
    return seen


def tokenize(args: argparse.Namespace) -> dict[str, Any]:
    """Prompt ids as llama-cpp-python's completion (or, with --chat, chat completion) builds them."""
    llama = load(args)
    reply = completion_prompt(llama, args.text, args.chat)
    if args.chat:
        reply["chat_format"] = llama.chat_format
    return reply


def is_end(llama: Llama, token: int) -> bool:
    return bool(llama_cpp.llama_vocab_is_eog(llama._model.vocab, token))


def greedy(args: argparse.Namespace) -> dict[str, Any]:
    """Greedy (temperature 0) continuation ids; an end-of-generation token ends it and is kept."""
    llama = load(args)
    out: list[int] = []
    room = N_CTX - len(args.prompt_ids)
    for token in llama.generate(args.prompt_ids, temp=0.0, repeat_penalty=1.0):
        out.append(int(token))
        if is_end(llama, token) or len(out) >= min(args.max_tokens, room):
            break
    return {"token_ids": out}


def timed_greedy(args: argparse.Namespace) -> dict[str, Any]:
    """Greedy ids and their timing, the median over repeats (after one warm-up): seconds to the first token and
    from it to the last. --prompt-lookup K: llama-cpp-python's prompt-lookup speculative decoding
    (LlamaPromptLookupDecoding, K guesses a step, n-grams of up to 2 tokens)."""
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    draft = LlamaPromptLookupDecoding(num_pred_tokens=args.prompt_lookup) if args.prompt_lookup else None
    # a draft model turns logits_all on, but llama-cpp-python 0.3.36 sizes its score buffer from the argument
    # (n_batch rows without it): a prompt longer than n_batch then fails, so it is passed explicitly
    llama = Llama(model_path=args.gguf, n_ctx=N_CTX, n_threads=args.threads, n_threads_batch=args.threads,
                  draft_model=draft, logits_all=draft is not None, verbose=False)
    room = min(args.max_tokens, N_CTX - len(args.prompt_ids))

    def one() -> tuple[list[int], float, float]:
        llama.reset()
        out: list[int] = []
        with Stopwatch() as whole:
            for token in llama.generate(args.prompt_ids, temp=0.0, repeat_penalty=1.0, reset=True):
                if not out:
                    first = whole.elapsed()
                out.append(int(token))
                if is_end(llama, token) or len(out) >= room:
                    break
        return out, first, whole.seconds - first

    one()  # warm-up
    runs = [one() for _ in range(args.repeats)]
    return {"token_ids": runs[0][0], "first_token_s": sorted(r[1] for r in runs)[len(runs) // 2],
            "rest_s": sorted(r[2] for r in runs)[len(runs) // 2], "rest_runs_s": [r[2] for r in runs],
            "prompt_lookup": args.prompt_lookup}


def teacher_forced(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate the whole sequence at once; the argmax and top-1 margin at every position."""
    llama = load(args, logits_all=True)
    llama.eval(args.ids)
    logits = llama.scores[: len(args.ids)]  # [S, V]
    top2 = np.sort(np.partition(logits, -2, axis=1)[:, -2:], axis=1)  # [S, 2]
    return {
        "argmax": logits.argmax(axis=1).tolist(),
        "margin": (top2[:, 1] - top2[:, 0]).tolist(),  # top-1 minus top-2 logit
    }


def one_run(llama: Llama, prompt: list[int], gen_tokens: int) -> tuple[float, float]:
    """Seconds for the prefill (and first sample), then for gen_tokens one-token steps."""
    llama.reset()  # n_tokens = 0: the next eval drops the whole KV cache
    steps = llama.generate(prompt, temp=0.0, repeat_penalty=1.0)
    with Stopwatch() as prefill:
        next(steps)
    with Stopwatch() as decode:
        for _ in range(gen_tokens):
            next(steps)  # evaluates the previous token, samples the next
    steps.close()
    return prefill.seconds, decode.seconds


def speed(args: argparse.Namespace) -> dict[str, Any]:
    """Prefill and single-stream decode tokens/s, the median over repeats (after one warm-up)."""
    llama = load(args)
    prompt = speed_prompt_ids(args.prompt_tokens, llama.n_vocab())
    one_run(llama, prompt[:16], 4)  # warm-up
    runs = [one_run(llama, prompt, args.gen_tokens) for _ in range(args.repeats)]
    prefill, prefill_runs = median_rate(args.prompt_tokens, [p for p, _ in runs])
    decode, decode_runs = median_rate(args.gen_tokens, [d for _, d in runs])
    return {
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "engine": "llama.cpp",
        "version": llama_cpp.__version__,
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "prefill_runs_tok_s": prefill_runs,
        "decode_runs_tok_s": decode_runs,
        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
    }


COMMANDS = {
    "tokenize": (tokenize, ["gguf", "text", "chat", "threads"]),
    "greedy": (greedy, ["gguf", "prompt_ids", "max_tokens", "threads"]),
    "teacher-forced": (teacher_forced, ["gguf", "ids", "threads"]),
    "timed-greedy": (timed_greedy, ["gguf", "prompt_ids", "max_tokens", "prompt_lookup", "repeats", "threads"]),
    "speed": (speed, ["gguf", "prompt_tokens", "gen_tokens", "repeats", "threads"]),
}

if __name__ == "__main__":
    main(__doc__.splitlines()[0], COMMANDS)
