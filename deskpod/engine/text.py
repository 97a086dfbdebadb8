"""A request's text as it grows: detokenized deltas, stop strings held back until they can be ruled out."""

from __future__ import annotations

from deskpod.engine.tokenizer import IncrementalDetokenizer, Tokenizer


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters could still grow into a stop string, so must not be shown yet."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...], include_stop: bool = False, skip_special: bool = True):
        """`include_stop`: keep the stop string that ends the text; `skip_special`: leave special tokens out."""
        self._detok = IncrementalDetokenizer(tokenizer, skip_special)
        self._stops = stops
        self._include_stop = include_stop
        self._search_from = 0  # stop strings are looked for from here: text before min_tokens cannot stop
        self._shown = 0
        self.text = ""  # the final text so far: cut before (or after) a stop string once one is seen
        self.stopped = False  # a stop string was generated

    def push(self, token_id: int, can_stop: bool = True) -> str:
        """Add a token; returns the text that can be shown now. With `can_stop` False (min_tokens not
        reached), a stop string that ends in the text so far never stops it."""
        self._detok.push(token_id)
        full = self._detok.text
        if not can_stop:
            longest = max((len(s) for s in self._stops), default=1)
            self._search_from = max(0, len(full) - longest + 1)
        hits = [(i, len(s)) for s in self._stops if (i := full.find(s, self._search_from)) >= 0] if can_stop else []
        if hits:
            start, length = min(hits)
            self.stopped, self.text = True, full[: start + length * self._include_stop]
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
