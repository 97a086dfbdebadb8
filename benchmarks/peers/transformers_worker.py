"""Hugging Face transformers as the float peer: logits, greedy ids, speed, prompt ids.

transformers dequantizes the GGUF's weights to float32 on load, so this is the float
reference for a quantized model. Runs in benchmarks/.venv-peers (bash benchmarks/setup_peers.sh),
offline:

    benchmarks/.venv-peers/bin/python benchmarks/peers/transformers_worker.py \
        logits --gguf MODEL.gguf --ids '[504, 3575, 282]' --out /tmp/logits.npy

Every command prints one JSON object on stdout.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported
os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF dequantization bar writes to stderr

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel  # noqa: E402
from worker_common import Stopwatch, main, median_rate, speed_prompt_ids  # noqa: E402

transformers.utils.logging.set_verbosity_error()


def gguf_location(path: str) -> dict[str, str]:
    gguf = Path(path).resolve()
    return {"pretrained_model_name_or_path": str(gguf.parent), "gguf_file": gguf.name}


def load_model(args: argparse.Namespace) -> PreTrainedModel:
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(**gguf_location(args.gguf), dtype=torch.float32)
    return model.eval()


def logits(args: argparse.Namespace) -> dict[str, Any]:
    """float32 logits [S, V] of the whole sequence, saved with numpy.save to --out."""
    model = load_model(args)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([args.ids])).logits[0].float().numpy()  # [S, V]
    np.save(args.out, out)
    return {"out": args.out, "shape": list(out.shape), "argmax": out.argmax(axis=1).tolist()}


def greedy(args: argparse.Namespace) -> dict[str, Any]:
    """Greedy continuation ids; the end-of-sequence token ends it and is kept."""
    model = load_model(args)
    prompt = torch.tensor([args.prompt_ids])  # [1, S]
    with torch.inference_mode():
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=args.max_tokens,
            do_sample=False,
            num_beams=1,
            temperature=None,
            top_p=None,
            top_k=None,
            repetition_penalty=1.0,
            pad_token_id=model.generation_config.eos_token_id,
        )
    return {"token_ids": out[0, prompt.shape[1] :].tolist()}


def tokenize(args: argparse.Namespace) -> dict[str, Any]:
    """Prompt ids from the GGUF-derived tokenizer (with --chat, through apply_chat_template)."""
    tokenizer = AutoTokenizer.from_pretrained(**gguf_location(args.gguf))
    if not args.chat:
        return {"prompt_token_ids": tokenizer(args.text)["input_ids"], "rendered": args.text}
    messages = [{"role": "user", "content": args.text}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return {"prompt_token_ids": ids, "rendered": rendered}


def one_run(model: PreTrainedModel, prompt: torch.Tensor, gen_tokens: int) -> tuple[float, float]:
    """Seconds for the prefill, then for gen_tokens greedy one-token steps on the KV cache."""
    with torch.inference_mode():
        with Stopwatch() as prefill:
            out = model(input_ids=prompt, use_cache=True)
        with Stopwatch() as decode:
            for _ in range(gen_tokens):
                token = out.logits[:, -1].argmax(dim=-1, keepdim=True)  # [1, 1]
                out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
    return prefill.seconds, decode.seconds


def speed(args: argparse.Namespace) -> dict[str, Any]:
    """Prefill and single-stream decode tokens/s, the median over repeats (after one warm-up)."""
    model = load_model(args)
    prompt = torch.tensor([speed_prompt_ids(args.prompt_tokens, model.config.vocab_size)])
    one_run(model, prompt[:, :16], 4)  # warm-up
    runs = [one_run(model, prompt, args.gen_tokens) for _ in range(args.repeats)]
    prefill, prefill_runs = median_rate(args.prompt_tokens, [p for p, _ in runs])
    decode, decode_runs = median_rate(args.gen_tokens, [d for _, d in runs])
    return {
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "engine": "transformers",
        "version": transformers.__version__,
        "torch": torch.__version__,
        "dtype": "float32",
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "prefill_runs_tok_s": prefill_runs,
        "decode_runs_tok_s": decode_runs,
    }


COMMANDS = {
    "logits": (logits, ["gguf", "ids", "out", "threads"]),
    "greedy": (greedy, ["gguf", "prompt_ids", "max_tokens", "threads"]),
    "tokenize": (tokenize, ["gguf", "text", "chat"]),
    "speed": (speed, ["gguf", "prompt_tokens", "gen_tokens", "repeats", "threads"]),
}

if __name__ == "__main__":
    main(__doc__.splitlines()[0], COMMANDS)
