"""The `deskpod` command. Each subcommand is a thin adapter over the library; user errors print as one line."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from deskpod import __version__
from deskpod.engine.config import DEVICE_HELP, KV_CACHE_DTYPE_HELP, KV_CACHE_DTYPES, SPECULATIVE_HELP
from deskpod.errors import DeskpodError

# Modules that add their own subcommands with register(subparsers); imported only when present.
COMMAND_MODULES = ("deskpod.store.cli", "deskpod.plan.cli", "deskpod.server.cli", "deskpod.quant.cli", "deskpod.deploy.cli",
                   "deskpod.link.cli")

# Ollama and llama.cpp's defaults for interactive use: a little randomness, truncated tails.
CLI_SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95}


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=CLI_SAMPLING["temperature"], help="0 for greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=CLI_SAMPLING["top_k"], help="0 disables (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=CLI_SAMPLING["top_p"], help="(default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens to generate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    p.add_argument("--stop", action="append", default=[], help="stop before this text (repeatable)")
    p.add_argument("--ctx", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--weights", choices=("compact", "float32"), default="compact", help="keep GGUF blocks compact (default) or expand to float32")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto", help=KV_CACHE_DTYPE_HELP)
    p.add_argument("--speculative-config", metavar="JSON", default=None, help=SPECULATIVE_HELP)


def _sampling(args):
    from deskpod.engine.sampler import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )


def _load(args):
    from deskpod.engine.llm import LLM

    from deskpod.engine.config import SpeculativeConfig, resolve_device

    return LLM(args.model, weights=args.weights, context=args.ctx, threads=args.threads, device=resolve_device(args.device),
               kv_cache_dtype=args.kv_cache_dtype, speculative=SpeculativeConfig.from_json(args.speculative_config))


def cmd_run(args) -> int:
    params = _sampling(args)  # bad values fail before the model loads
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = _load(args)
    if not args.raw and not llm.tokenizer.has_chat_template:
        print(f"{args.model} has no chat template (a base model, not a chat model): running the prompt as raw text",
              file=sys.stderr)
    raw = args.raw or not llm.tokenizer.has_chat_template
    ids = llm.prompt_ids(prompt) if raw else llm.chat_prompt([{"role": "user", "content": prompt}])
    it = llm.stream(ids, params)
    while True:
        try:
            delta = next(it)
        except StopIteration as done:
            completion = done.value
            break
        if not args.json:
            print(delta, end="", flush=True)
    if args.json:
        print(json.dumps({"prompt_token_ids": completion.prompt_token_ids, "token_ids": completion.token_ids,
                          "text": completion.text, "finish_reason": completion.finish_reason}))
    else:
        print()
    return 0


def cmd_chat(args) -> int:
    params = _sampling(args)
    llm = _load(args)
    if not llm.tokenizer.has_chat_template:
        raise DeskpodError(f"{args.model} has no chat template (a base model, not a chat model): "
                           f"prompt it with `deskpod run {args.model} TEXT` instead")
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print(f"Chatting with {args.model}. /clear forgets the conversation, /bye (or Ctrl-D) ends it.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/bye", "/exit", "/quit"):
            return 0
        if line.strip() == "/clear":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        it = llm.stream(llm.chat_prompt(history), params)
        try:
            while True:
                print(next(it), end="", flush=True)
        except StopIteration as done:
            history.append({"role": "assistant", "content": done.value.text})
        except KeyboardInterrupt:  # stop this answer, keep the session
            history.pop()
        print()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deskpod", description="Model store, LLM engine and server for a personal AI supercomputer.")
    parser.add_argument("--version", action="version", version=f"deskpod {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="generate a reply to one prompt, streamed to the terminal")
    run.add_argument("model", help="a store model (pulled if it is in the catalog), a .gguf file or a model folder")
    run.add_argument("prompt", help="the prompt; - reads it from standard input")
    run.add_argument("--raw", action="store_true", help="plain completion: no chat template")
    run.add_argument("--json", action="store_true", help='print {"prompt_token_ids", "token_ids", "text", "finish_reason"}')
    _add_sampling_args(run)
    run.set_defaults(func=cmd_run)

    chat = sub.add_parser("chat", help="an interactive chat session")
    chat.add_argument("model")
    chat.add_argument("--system", default=None, help="a system prompt")
    _add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("deskpod").setLevel(logging.INFO)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except DeskpodError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
