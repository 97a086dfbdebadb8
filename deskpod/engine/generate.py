"""One sequence from prompt to finish: prefill, decode, stop conditions, streamed text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from deskpod.engine.loader import LoadedModel
from deskpod.engine.models.llama import KVCache
from deskpod.engine.sampler import Sampler, SamplingParams
from deskpod.engine.tokenizer import IncrementalDetokenizer
from deskpod.errors import PromptTooLong


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"


def check_prompt(n_prompt: int, context: int) -> None:
    if n_prompt == 0:
        raise PromptTooLong("the prompt is empty: give at least one token")
    if n_prompt >= context:
        raise PromptTooLong(
            f"the prompt has {n_prompt} tokens but the context holds {context}: shorten the prompt"
            " (or raise the context length if the model allows it)"
        )


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters could still grow into a stop string, so must not be shown yet."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def stream(lm: LoadedModel, prompt_ids: list[int], params: SamplingParams, context: int | None = None) -> Iterator[str]:
    """Yields text deltas; the returned Completion (StopIteration.value) holds ids, text and finish reason."""
    context = min(context or lm.config.max_context, lm.config.max_context)
    check_prompt(len(prompt_ids), context)
    budget = min(params.max_tokens, context - len(prompt_ids))
    cache = KVCache(lm.config, len(prompt_ids) + budget)
    sampler, detok = Sampler(params), IncrementalDetokenizer(lm.tokenizer)
    out = Completion(list(prompt_ids))
    shown, final_text = 0, None
    logits = lm.model(torch.tensor(prompt_ids), torch.arange(len(prompt_ids)), cache)
    while True:
        token = sampler(logits[-1])
        if token in lm.tokenizer.eog_ids and not params.ignore_eos:
            out.finish_reason = "stop"
            break
        out.token_ids.append(token)
        detok.push(token)
        hit = [i for i in (detok.text.find(s) for s in params.stop) if i >= 0]
        if hit:
            final_text, out.finish_reason = detok.text[: min(hit)], "stop"
            break
        visible = len(detok.text) - _held_back(detok.text, params.stop)
        if visible > shown:
            yield detok.text[shown:visible]
            shown = visible
        if len(out.token_ids) >= budget:
            out.finish_reason = "length"
            break
        position = len(prompt_ids) + len(out.token_ids) - 1
        logits = lm.model(torch.tensor([token]), torch.tensor([position]), cache)
    out.text = detok.text if final_text is None else final_text
    if len(out.text) > shown:
        yield out.text[shown:]
    return out


def generate(lm: LoadedModel, prompt_ids: list[int], params: SamplingParams, context: int | None = None) -> Completion:
    it = stream(lm, prompt_ids, params, context)
    while True:
        try:
            next(it)
        except StopIteration as done:
            return done.value
