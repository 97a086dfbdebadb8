"""Structured outputs: the reply constrained to a JSON schema, a regex, a choice or a grammar, token by token.

llguidance (the grammar engine behind llama.cpp's and vLLM's guidance backend) computes, before each token,
which tokens of the model's vocabulary keep the output inside the grammar; the sampler sends the others to
-inf. It reads the model's own `tokenizers` vocabulary, so a token that spans several grammar symbols is
handled exactly, and it builds its tables lazily: no per-schema precompilation over the vocabulary.
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING

import numpy as np
import torch

from deskpod.engine.sampler import StructuredOutput
from deskpod.errors import InvalidRequest

if TYPE_CHECKING:
    import llguidance

    from deskpod.engine.tokenizer import Tokenizer

# JSON may have whitespace between its tokens, as models write it, but in short runs: a small model left to
# whitespace that the grammar allows without end can emit newlines until max_tokens.
JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,16}"}


def grammar_of(spec: StructuredOutput) -> str:
    """llguidance's grammar for a structured output (ValueError naming what is wrong in it)."""
    from llguidance import LLMatcher, regex_to_lark
    from llguidance.gbnf_to_lark import gbnf_to_lark

    if spec.kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(spec.spec, defaults=JSON_OPTIONS)
    if spec.kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if spec.kind == "regex":  # \d, \w and \s as in Python's and JavaScript's regexes, not all of Unicode's
        return LLMatcher.grammar_from_regex(regex_to_lark(spec.spec, use_ascii="dws"))
    if spec.kind == "choice":
        choices = json.loads(spec.spec)
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    if spec.kind == "lark":
        return LLMatcher.grammar_from_lark(spec.spec)
    if spec.kind == "gbnf":
        try:
            return LLMatcher.grammar_from_lark(gbnf_to_lark(spec.spec))
        except Exception as e:  # noqa: BLE001 - the converter raises its own error types
            raise ValueError(f"the GBNF grammar does not parse: {e}") from None
    raise ValueError(f"unknown structured output kind {spec.kind!r}")


class GrammarConstraint:
    """One request's position in its grammar (deskpod.engine.sampler.TokenConstraint)."""

    def __init__(self, matcher: llguidance.LLMatcher, tokenizer_vocab: int):
        self.matcher = matcher
        self._bits = torch.zeros((tokenizer_vocab + 31) // 32, dtype=torch.int32)

    def mask(self, vocab_size: int) -> torch.Tensor | None:
        self.matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)
        allowed = np.unpackbits(self._bits.numpy().view(np.uint8), bitorder="little")
        out = torch.zeros(vocab_size, dtype=torch.bool)  # ids past the tokenizer's (padding rows) never allowed
        n = min(vocab_size, len(allowed))
        out[:n] = torch.from_numpy(allowed[:n]).bool()
        return out

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the structured output's grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        return self.matcher.is_stopped()


class StructuredOutputs:
    """Builds the constraints of one model's requests. The llguidance tokenizer (about a second to build for a
    large vocabulary) is made on first use, once."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._ll: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def _ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:
                from llguidance import LLTokenizer

                hf = self.tokenizer.vocabulary.hf
                self._ll = LLTokenizer(hf.to_str(), n_vocab=hf.get_vocab_size(with_added_tokens=True),
                                       eos_token=sorted(self.tokenizer.eog_ids))
            return self._ll

    def constraint(self, spec: StructuredOutput) -> GrammarConstraint:
        """The constraint for a new request; InvalidRequest saying what is wrong with the grammar."""
        from llguidance import LLMatcher

        try:
            grammar = grammar_of(spec)
        except ValueError as e:
            raise InvalidRequest(f"the {_name(spec)} cannot be used: {e}") from None
        ll = self._ll_tokenizer()
        matcher = LLMatcher(ll, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"the {_name(spec)} cannot be used: {matcher.get_error()}")
        return GrammarConstraint(matcher, ll.vocab_size)


def _name(spec: StructuredOutput) -> str:
    return {"json_schema": "JSON schema", "json_object": "JSON object format", "regex": "regex",
            "choice": "choice list", "lark": "Lark grammar", "gbnf": "GBNF grammar"}[spec.kind]
