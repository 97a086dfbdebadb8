"""Sampling parameters and next-token selection: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deskpod.errors import DeskpodError


class InvalidSamplingParams(DeskpodError):
    pass


# A temperature below this samples as greedy (vLLM's bound): dividing logits by it would overflow them.
GREEDY_BELOW = 1e-5
# What torch.Generator.manual_seed takes: a 64-bit integer, signed or not.
SEED_RANGE = (-(2**63), 2**64 - 1)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the chosen token's log-probability and the k most likely

    def __post_init__(self):
        seed_ok = self.seed is None or (_is_int(self.seed) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1])
        checks = [
            (_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens must be an integer, at least 1"),
            (_is_number(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0,
             "temperature must be 0 (greedy) or more"),
            (_is_int(self.top_k) and self.top_k >= 0, "top_k must be an integer, 0 (off) or more"),
            (_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (seed_ok, f"seed must be a 64-bit integer ({SEED_RANGE[0]} to {SEED_RANGE[1]})"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= 20),
             "logprobs must be an integer between 0 and 20"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidSamplingParams(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not a count


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Sampler:
    """Picks tokens for one request; owns its random generator so a seed reproduces the output."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        # logits: [vocab] float32
        p = self.params
        if p.greedy:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            drop = torch.cumsum(sorted_probs, 0) - sorted_probs >= p.top_p
            sorted_probs[drop] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))
