"""Draft tokens for speculative decoding: guesses at what follows a request, which the engine checks in one
forward pass (see scheduler.py), so that a wrong one costs a row of compute and nothing else.

- NgramDrafter (vLLM's `ngram`, prompt lookup) guesses from the request's own tokens. Text that is being
  edited, summarised or quoted repeats its prompt: when the last n tokens occurred before, the tokens that
  followed them then are a good guess for the next ones. The longest n (from `prompt_lookup_max` down to
  `prompt_lookup_min`) whose n-gram occurred before wins, and of its occurrences the latest, nearest in the text.
- ModelDrafter (`draft_model`) has a smaller model with the same tokenizer decode greedily, ahead of the
  target: one forward pass for the tokens it has not seen yet, then one per further guess. Each request keeps
  the draft's keys and values of its own tokens, so only what changed since its last guesses is computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

import torch

from deskpod.engine.config import EngineConfig, SpeculativeConfig
from deskpod.engine.loader import LoadedModel, load_model
from deskpod.errors import DeskpodError


class Drafter(Protocol):
    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k guesses at the tokens after `tokens` (the request's prompt and output so far)."""


class NgramDrafter:
    """One request's n-gram index, extended as its tokens grow: n-gram -> where its latest occurrence ended."""

    def __init__(self, config: SpeculativeConfig):
        self.sizes = range(config.prompt_lookup_max, config.prompt_lookup_min - 1, -1)  # longest first
        self._ends: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # n-grams ending at positions up to here are in _ends

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens to follow `tokens` (the request's prompt and output so far); [] when no suffix of it
        occurred before."""
        end = len(tokens)
        if k < 1 or end < 2:
            return []
        self._index(tokens, end - 1)  # every occurrence but the suffix itself
        for n in self.sizes:
            if n < end:
                found = self._ends.get(tuple(tokens[end - n :]))
                if found is not None:
                    return list(tokens[found : found + k])
        return []

    def _index(self, tokens: Sequence[int], upto: int) -> None:
        for stop in range(self._indexed + 1, upto + 1):
            for n in self.sizes:
                if n <= stop:
                    self._ends[tuple(tokens[stop - n : stop])] = stop
        self._indexed = max(self._indexed, upto)


class ModelDrafter:
    """One request's greedy guesses from the draft model, over a KV cache of its own that grows with the request."""

    def __init__(self, draft: LoadedModel):
        self.draft = draft
        self.cache = None
        self._cached: list[int] = []  # the tokens whose keys and values the cache holds, in order

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        k = min(k, self.draft.context - len(tokens))  # the draft's positions end at its context
        if k < 1 or not tokens:
            return []
        # the cache stays good up to the first token that differs (a rejected guess), and the last token is
        # computed again in any case: its logits are the first guess
        valid = next((i for i, (a, b) in enumerate(zip(self._cached, tokens)) if a != b), min(len(self._cached), len(tokens)))
        valid = min(valid, len(tokens) - 1)
        self._reserve(len(tokens) + k - 1)
        fed = list(tokens)
        logits = self.draft.model(torch.tensor(fed[valid:]), torch.arange(valid, len(fed)), self.cache)
        guesses = [int(logits[-1].argmax())]
        while len(guesses) < k:
            fed.append(guesses[-1])
            logits = self.draft.model(torch.tensor(guesses[-1:]), torch.tensor([len(fed) - 1]), self.cache)
            guesses.append(int(logits[-1].argmax()))
        self._cached = fed
        return guesses

    def _reserve(self, tokens: int) -> None:
        """Room for `tokens` positions: a cache twice as large as before when it is short (its keys and values kept)."""
        from deskpod.engine.models.layers import KVCache

        if self.cache is not None and self.cache.num_blocks * self.cache.block_size >= tokens:
            return
        held = 0 if self.cache is None else self.cache.num_blocks * self.cache.block_size
        model = self.draft.model
        device = model.blocks[0].attn_norm.weight.device
        grown = KVCache(self.draft.spec, min(max(tokens, 2 * held, 256), self.draft.context), model.dtype, device)
        if self.cache is not None:
            grown.k[:, : self.cache.num_blocks] = self.cache.k
            grown.v[:, : self.cache.num_blocks] = self.cache.v
        self.cache = grown


class Drafts:
    """The engine's source of drafters: one per request, of the configured method."""

    def __init__(self, spec: SpeculativeConfig, target: LoadedModel, config: EngineConfig):
        self.spec, self.draft = spec, None
        if spec.method == "draft_model":
            if spec.model not in target.drafts:  # loaded once per model, not per engine (each LLM.generate makes one)
                target.drafts[spec.model] = load_draft(spec.model, target, config)
            self.draft = target.drafts[spec.model]

    def new(self) -> Drafter:
        return ModelDrafter(self.draft) if self.draft is not None else NgramDrafter(self.spec)


def load_draft(name: str, target: LoadedModel, config: EngineConfig) -> LoadedModel:
    """The draft model `name` (a store name, pulled first when it is a catalog name, or a path), loaded as the
    target is (device, dtype, threads), checked to share the target's tokenizer."""
    from deskpod.engine.llm import resolve_model_file  # the LLM API imports the engine: resolved at call time

    try:
        path = resolve_model_file(name)
    except DeskpodError as e:  # say which of the two models it is
        raise DeskpodError(f"the draft model (speculative decoding's model): {e}") from None
    draft = load_model(path, replace(config, speculative=None, context=None), name=name)
    same = draft.tokenizer.vocabulary_ids() == target.tokenizer.vocabulary_ids()
    if not same or draft.spec.vocab_size > target.spec.vocab_size:
        raise DeskpodError(
            f"the draft model {name} does not share {target.label}'s tokenizer ({draft.tokenizer.vocab_size:,} tokens "
            f"against {target.tokenizer.vocab_size:,}{'' if same else ', different tokens'}): a draft must "
            "guess in the target's token ids; pick a smaller model of the same family"
        )
    return draft
