"""Sampling parameters and next-token selection for one request.

The logits of a step go through, in this order (vLLM's): the token masks (allowed_token_ids, the structured
output's grammar, no end of generation before min_tokens), logit_bias, the repetition / frequency / presence
penalties, then greedy (the argmax) or temperature, min_p, top_k, top_p and a seeded draw. Reported logprobs are the
model's own (before any of this), as vLLM and OpenAI report them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from deskpod.errors import DeskpodError


class InvalidSamplingParams(DeskpodError):
    pass


# A temperature below this samples as greedy (vLLM's bound): dividing logits by it would overflow them.
GREEDY_BELOW = 1e-5
# What torch.Generator.manual_seed takes: a 64-bit integer, signed or not.
SEED_RANGE = (-(2**63), 2**64 - 1)
MAX_LOGPROBS = 20
LOGIT_BIAS_RANGE = 100.0  # OpenAI's: -100 bans a token, +100 all but forces it


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match: kind is "json_schema" (spec: the schema as JSON text), "json_object" (any
    JSON object), "regex", "choice" (spec: a JSON list of strings), "lark" or "gbnf" (a grammar's text)."""

    kind: str
    spec: str = ""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # these end the request as end-of-generation tokens do
    include_stop_str_in_output: bool = False  # keep the stop string (or stop token's text) in the text
    ignore_eos: bool = False
    min_tokens: int = 0  # no end of generation (EOS, stop_token_ids, stop strings) before this many tokens
    # penalties: presence and frequency over the generated tokens (OpenAI's), repetition over prompt and
    # generated tokens (CTRL's, divides positive logits); with penalty_window, all three over the last
    # penalty_window tokens of prompt and reply instead (llama.cpp's repeat_last_n)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    penalty_window: int | None = None
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    allowed_token_ids: tuple[int, ...] | None = None
    logprobs: int | None = None  # None: none; k: the chosen token's log-probability and the k most likely
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    skip_special_tokens: bool = True  # leave special tokens' text out of the reply
    structured: StructuredOutput | None = None

    def __post_init__(self):
        seed_ok = self.seed is None or (_is_int(self.seed) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1])
        checks = [
            (_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens must be an integer, at least 1"),
            (_is_number(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0,
             "temperature must be 0 (greedy) or more"),
            (_is_int(self.top_k) and self.top_k >= 0, "top_k must be an integer, 0 (off) or more"),
            (_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (seed_ok, f"seed must be a 64-bit integer ({SEED_RANGE[0]} to {SEED_RANGE[1]})"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be token ids (integers, 0 or more)"),
            (_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
             "min_tokens must be an integer from 0 to max_tokens"),
            (_is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (_is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (_is_number(self.repetition_penalty) and 0 < self.repetition_penalty <= 10, "repetition_penalty must be in (0, 10]"),
            (self.penalty_window is None or (_is_int(self.penalty_window) and self.penalty_window >= 1),
             "penalty_window must be an integer, at least 1"),
            (all(_is_int(t) and t >= 0 and _is_number(b) and abs(b) <= LOGIT_BIAS_RANGE for t, b in self.logit_bias.items()),
             f"logit_bias maps token ids to biases in [-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}]"),
            (self.allowed_token_ids is None or (bool(self.allowed_token_ids) and all(_is_int(t) and t >= 0 for t in self.allowed_token_ids)),
             "allowed_token_ids must list at least one token id"),
            (self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"logprobs must be an integer between 0 and {MAX_LOGPROBS}"),
            (self.prompt_logprobs is None or (_is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
             f"prompt_logprobs must be an integer between 0 and {MAX_LOGPROBS}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidSamplingParams(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def token_ids(self) -> dict[str, Sequence[int]]:
        """The fields naming token ids, for the engine to check against the vocabulary."""
        return {"stop_token_ids": self.stop_token_ids, "logit_bias": list(self.logit_bias),
                "allowed_token_ids": self.allowed_token_ids or ()}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not a count


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class TokenConstraint(Protocol):
    """A structured output's state for one request (deskpod.engine.structured)."""

    def mask(self, vocab_size: int) -> torch.Tensor | None:
        """[vocab_size] bool, True where a token may come next; None when anything may."""

    def accept(self, token: int) -> None:
        """Advance past the sampled token."""

    @property
    def finished(self) -> bool:
        """True once the output is complete: nothing may follow."""


class Sampler:
    """Picks tokens for one request. It owns the request's random generator (a seed reproduces the output),
    the token counts the penalties need and its structured output's state, so it lives as long as the
    request, preemptions included."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int] = (), end_ids: frozenset[int] = frozenset(),
                 constraint: TokenConstraint | None = None):
        """`end_ids`: the tokens that would end the request (end of generation and stop_token_ids), held back
        until min_tokens; `constraint`: the structured output to follow."""
        self.params = params
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.end_ids = sorted(end_ids)
        self.constraint = constraint
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: [vocab] float32, the model's -> the next token (recorded: the penalties and the structured
        output follow the request's own tokens)."""
        logits = self.processed(logits)
        token = self._pick(logits)
        self.output_ids.append(token)
        if self.constraint is not None:
            self.constraint.accept(token)
        return token

    @property
    def ended(self) -> bool:
        """The last token ends the output (an end token, or a complete structured output): nothing is sampled after it."""
        last = self.output_ids[-1:]
        return bool(last) and (last[0] in self.end_ids or (self.constraint is not None and self.constraint.finished))

    def processed(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits after masks, bias and penalties (a new tensor: the caller's are reported as they are)."""
        p = self.params
        logits = logits.clone()
        if p.logit_bias:
            ids, bias = self._bias or self._bias_tensors()
            logits.index_add_(0, ids, bias)
        if p.penalized:
            self._penalize(logits)
            # a repetition penalty near 0 (5e-324 is in range) divides a logit to +inf, its limit: the largest finite
            logits.clamp_(max=torch.finfo(logits.dtype).max)
        # masks last: a penalty that multiplies a masked -inf by a float32 zero would make it NaN
        allowed = self._allowed(len(logits))
        if allowed is not None:
            if not allowed.any():
                raise InvalidSamplingParams("no token is allowed here: the request's token masks exclude every token")
            logits.masked_fill_(~allowed, float("-inf"))
        return logits

    def _allowed(self, vocab_size: int) -> torch.Tensor | None:
        p, masks = self.params, []
        if p.allowed_token_ids is not None:
            only = torch.zeros(vocab_size, dtype=torch.bool)
            only[list(p.allowed_token_ids)] = True
            masks.append(only)
        grammar = self.constraint.mask(vocab_size) if self.constraint is not None else None
        if grammar is not None:
            masks.append(grammar)
        if len(self.output_ids) < p.min_tokens and self.end_ids:
            not_yet = torch.ones(vocab_size, dtype=torch.bool)
            not_yet[self.end_ids] = False
            # a structured output that is complete can only end: min_tokens yields to it
            if grammar is None or (grammar & not_yet).any():
                masks.append(not_yet)
        if not masks:
            return None
        allowed = masks[0]
        for m in masks[1:]:
            allowed = allowed & m
        return allowed

    def _bias_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        items = sorted(self.params.logit_bias.items())
        self._bias = (torch.tensor([t for t, _ in items]), torch.tensor([float(b) for _, b in items]))
        return self._bias

    def _penalize(self, logits: torch.Tensor) -> None:
        p, vocab = self.params, len(logits)
        if p.penalty_window is not None:  # llama.cpp: every penalty over the last tokens, prompt included
            recent = (self.prompt_ids + self.output_ids)[-p.penalty_window :]
            counts = seen = torch.bincount(torch.tensor(recent, dtype=torch.long), minlength=vocab)[:vocab]
        else:
            counts = torch.bincount(torch.tensor(self.output_ids, dtype=torch.long), minlength=vocab)[:vocab]
            seen = counts + torch.bincount(torch.tensor(self.prompt_ids, dtype=torch.long), minlength=vocab)[:vocab]
        if p.repetition_penalty != 1.0:
            hit = seen > 0
            penalized = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits.copy_(torch.where(hit, penalized, logits))
        if p.frequency_penalty:
            logits.sub_(p.frequency_penalty * counts.to(logits.dtype))
        if p.presence_penalty:
            logits.sub_(p.presence_penalty * (counts > 0).to(logits.dtype))

    def _pick(self, logits: torch.Tensor) -> int:
        p = self.params
        if p.greedy:
            return int(torch.argmax(logits))
        # shifted to a maximum of 0 first: a logit at float32's largest (a repetition penalty near 0) divided by a
        # temperature below 1 would overflow to inf, and the softmax would be NaN; no shift changes the softmax
        logits = (logits - logits.max()) / p.temperature
        if p.min_p:
            probs = torch.softmax(logits, dim=-1)
            logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            drop = torch.cumsum(sorted_probs, 0) - sorted_probs >= p.top_p
            drop[0] = False  # even for a top_p below float32's smallest number
            sorted_probs[drop] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))
