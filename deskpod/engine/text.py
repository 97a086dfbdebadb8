"""A request's text as it grows: detokenized deltas, stop strings held back until they can be ruled out."""

from __future__ import annotations

from deskpod.engine.tokenizer import IncrementalDetokenizer, Tokenizer


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters could still grow into a stop string, so must not be shown yet."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...]):
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = stops
        self._shown = 0
        self.text = ""  # the final text so far: cut before a stop string once one is seen
        self.stopped = False  # a stop string was generated

    def push(self, token_id: int) -> str:
        """Add a token; returns the text that can be shown now."""
        self._detok.push(token_id)
        full = self._detok.text
        hits = [i for i in (full.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped, self.text = True, full[: min(hits)]
            return self.flush()
        self.text = full
        visible = len(full) - held_back(full, self._stops)
        return self._show(visible)

    def flush(self) -> str:
        """Everything not shown yet: call when the request finishes."""
        return self._show(len(self.text))

    def _show(self, upto: int) -> str:
        if upto <= self._shown:
            return ""
        delta, self._shown = self.text[self._shown : upto], upto
        return delta
