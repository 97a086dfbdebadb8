"""What the peer workers share: the command line, the JSON reply, the speed prompt.

Stdlib only, so deskpod's benchmarks may import `speed_prompt_ids` too and feed
deskpod the very tokens the peers were timed on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

Command = Callable[[argparse.Namespace], dict[str, Any]]


def token_ids(text: str) -> list[int]:
    """Parse a JSON list of token ids."""
    ids = json.loads(text)
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise argparse.ArgumentTypeError("expected a JSON list of integers")
    return ids


# Arguments by name; each worker's command table lists the ones it takes.
ARGUMENTS: dict[str, tuple[str, dict[str, Any]]] = {
    "gguf": ("--gguf", dict(required=True, help="path to the .gguf model file")),
    "text": ("--text", dict(required=True, help="text to tokenize")),
    "chat": ("--chat", dict(action="store_true", help="apply the GGUF's chat template first")),
    "ids": ("--ids", dict(required=True, type=token_ids, help="JSON list of token ids")),
    "prompt_ids": ("--prompt-ids", dict(required=True, type=token_ids, help="JSON list of token ids")),
    "max_tokens": ("--max-tokens", dict(type=int, default=32, help="most new tokens (default 32)")),
    "out": ("--out", dict(required=True, help="where to write the .npy file")),
    "prompt_tokens": ("--prompt-tokens", dict(type=int, default=128, help="prefill length (default 128)")),
    "gen_tokens": ("--gen-tokens", dict(type=int, default=64, help="decode steps (default 64)")),
    "repeats": ("--repeats", dict(type=int, default=3, help="timed runs; the median is reported (default 3)")),
    "threads": ("--threads", dict(type=int, default=2, help="CPU threads (default 2)")),
    "prompt_lookup": ("--prompt-lookup", dict(type=int, default=0, help="guesses per step by prompt lookup (default 0: off)")),
}


def speed_prompt_ids(n: int, vocab_size: int, first: int = 256) -> list[int]:
    """A fixed, content-free prompt of n ordinary tokens (ids past the specials)."""
    return [first + (i * 7919) % (vocab_size - first) for i in range(n)]


def median_rate(tokens: int, seconds: Sequence[float]) -> tuple[float, list[float]]:
    """Tokens per second: the median over runs, and every run's."""
    rates = [tokens / s for s in seconds]
    return statistics.median(rates), rates


class Stopwatch:
    """`with Stopwatch() as sw: ...` then `sw.seconds`."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start

    def elapsed(self) -> float:
        """Seconds so far, inside the block."""
        return time.perf_counter() - self.start


def main(description: str, commands: dict[str, tuple[Command, list[str]]], argv: list[str] | None = None) -> None:
    """Parse `<command> --flags`, run it, print its reply as one JSON object on stdout."""
    parser = argparse.ArgumentParser(description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (run, arguments) in commands.items():
        command = sub.add_parser(name, help=(run.__doc__ or "").strip().splitlines()[0])
        for argument in arguments:
            flag, options = ARGUMENTS[argument]
            command.add_argument(flag, **options)
    args = parser.parse_args(argv)
    reply = commands[args.command][0](args)
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
