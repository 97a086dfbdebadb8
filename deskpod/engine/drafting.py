"""Draft tokens for speculative decoding, from the request's own tokens (prompt lookup, vLLM's `ngram`).

Text that is being edited, summarised or quoted repeats its prompt: when the last n tokens occurred before,
the tokens that followed them then are a good guess for the next ones. The longest n (from
`prompt_lookup_max` down to `prompt_lookup_min`) whose n-gram occurred before wins, and of its occurrences
the latest, nearest in the text. The engine checks the guesses in one forward pass (see scheduler.py), so a
wrong one costs a row of compute and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

from deskpod.engine.config import SpeculativeConfig


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
