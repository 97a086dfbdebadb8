"""A GGUF's vocabulary as a Hugging Face `tokenizers` tokenizer that splits text as llama.cpp does.

Two vocabulary kinds (tokenizer.ggml.model):
- "gpt2": byte-level BPE with the file's merges, pre-split by the regex llama.cpp applies for the file's
  `tokenizer.ggml.pre` (PRE_TOKENIZERS, from llama-vocab.cpp);
- "llama": SentencePiece (Gemma, Llama 2, Mistral): llama.cpp merges the adjacent pair whose union is the
  highest-scoring token in the vocabulary, falling back to <0xXX> byte tokens. A BPE whose merges are every
  split of every token, ranked by the merged token's score, makes the same choices.
Control, user-defined and unknown tokens are matched whole in the text, as llama.cpp does for a prompt
with special tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from deskpod.errors import CorruptModel, DeskpodError, UnsupportedModel

# ggml token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Tokens that end a turn in the common chat formats: generation stops at them as at EOS.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|endoftext|>")

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# OpenAI's o200k (gpt-4o, gpt-oss; llama.cpp's "gpt-4o"): cased words keep their capital, contractions stay on
# their word, numbers in threes, and a run of punctuation takes the newlines or slashes after it
_GPT4O_SPLIT = "|".join((
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
))
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2():
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _split_then_bytes(*patterns: str):
    """llama.cpp's pre-tokenization: each regex splits the pieces the previous ones left, then bytes map to
    byte-level symbols."""

    def build():
        splits = [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in patterns]
        return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    return build


# llama.cpp's regexes for a BPE vocabulary whose pre-tokenizer is "default" or missing
_DEFAULT_SPLITS = (
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
)


@dataclass(frozen=True)
class PreTokenizer:
    """What llama.cpp does for a byte-level BPE vocabulary with this `tokenizer.ggml.pre`."""

    build: Callable[[], Any]  # the pre-tokenizer: llama-vocab.cpp's regexes
    ignore_merges: bool = False  # a whole word that is a token is taken as it is (Llama 3)
    add_bos: bool = False  # the default when the file does not say


_LLAMA3 = PreTokenizer(_split_then_bytes(_LLAMA3_SPLIT), ignore_merges=True, add_bos=True)
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": PreTokenizer(_split_then_bytes(*_DEFAULT_SPLITS)),
    "gpt-2": PreTokenizer(_gpt2),
    "gpt2": PreTokenizer(_gpt2),
    "mpt": PreTokenizer(_gpt2),
    "olmo": PreTokenizer(_gpt2),
    "smollm": PreTokenizer(_digits_then_gpt2),
    "starcoder": PreTokenizer(_digits_then_gpt2),
    "refact": PreTokenizer(_digits_then_gpt2),
    "codeshell": PreTokenizer(_digits_then_gpt2),
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "qwen2": PreTokenizer(_split_then_bytes(_QWEN2_SPLIT)),
    "deepseek-r1-qwen": PreTokenizer(_split_then_bytes(_QWEN2_SPLIT)),
    "gpt-4o": PreTokenizer(_split_then_bytes(_GPT4O_SPLIT)),
}


@dataclass(frozen=True)
class SpecialTokens:
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    bos_text: str
    eos_text: str


@dataclass(frozen=True)
class Vocabulary:
    """What a tokenizer is made of, whichever file it came from."""

    hf: HFTokenizer
    special: SpecialTokens
    chat_template: str | None
    eog_ids: frozenset[int]  # ids that end generation (EOS, <|im_end|>, <end_of_turn>...)

    def save(self, folder: str | Path) -> None:
        """tokenizer.json and tokenizer_config.json (as Hugging Face writes them), generation_config.json's
        bos and end-of-generation ids: what `from_folder` reads back as this vocabulary."""
        folder = Path(folder)
        self.hf.save(str(folder / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.special.bos_text or None,
            "eos_token": self.special.eos_text or None,
            "add_bos_token": self.special.add_bos,
            "chat_template": self.chat_template,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        generation = {"bos_token_id": self.special.bos_id, "eos_token_id": sorted(self.eog_ids)}
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))


def vocabulary_from_gguf(meta: Mapping[str, Any], label: str) -> Vocabulary:
    kind = meta.get("tokenizer.ggml.model")
    if kind not in VOCABULARY_KINDS:
        raise UnsupportedModel(
            f"{label}: tokenizer model {kind!r} is not supported (supported: {', '.join(map(repr, VOCABULARY_KINDS))})"
        )
    tokens, types = _listed(meta, "tokenizer.ggml.tokens", str, label), _listed(meta, "tokenizer.ggml.token_type", int, label)
    if not tokens:
        raise UnsupportedModel(f"{label}: the file holds no vocabulary (tokenizer.ggml.tokens)")
    types = types or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise CorruptModel(f"{label}: {len(types)} token types for {len(tokens)} tokens")
    try:
        hf, add_bos = VOCABULARY_KINDS[kind](meta, tokens, types, label)
        hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)])
        hf.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == USER_DEFINED])
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception on a bad vocabulary
        if isinstance(e, DeskpodError):
            raise
        raise CorruptModel(f"{label}: its vocabulary cannot be built ({type(e).__name__}: {e})") from None
    special = _special_tokens(meta, tokens, add_bos)
    eog = {i for i in (special.eos_id, _token_id(meta, "tokenizer.ggml.eot_token_id", len(tokens))) if i is not None}
    vocab = {tok: i for i, tok in enumerate(tokens)}
    eog |= {vocab[t] for t in END_OF_TURN if t in vocab and types[vocab[t]] == CONTROL}
    template = meta.get("tokenizer.chat_template")
    return Vocabulary(hf, special, template if isinstance(template, str) else None, frozenset(eog))


def _listed(meta: Mapping[str, Any], key: str, kind: type, label: str) -> list:
    values = meta.get(key) or []
    if not isinstance(values, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
        raise CorruptModel(f"{label}: {key} is not a list of {kind.__name__} values")
    return values


def _byte_level_bpe(meta: Mapping[str, Any], tokens: list[str], types: list[int], label: str) -> tuple[HFTokenizer, bool]:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise UnsupportedModel(f"{label}: pre-tokenizer {pre!r} is not supported (supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    merges = [tuple(m.split(" ", 1)) for m in _listed(meta, "tokenizer.ggml.merges", str, label)]
    if any(len(m) != 2 for m in merges):
        raise CorruptModel(f"{label}: a merge in tokenizer.ggml.merges is not two tokens separated by a space")
    how = PRE_TOKENIZERS[pre]
    hf = HFTokenizer(models.BPE({tok: i for i, tok in enumerate(tokens)}, merges, ignore_merges=how.ignore_merges))
    hf.pre_tokenizer = how.build()
    hf.decoder = decoders.ByteLevel()
    return hf, how.add_bos


SPACE = "\u2581"  # SentencePiece's visible space


def _sentencepiece(meta: Mapping[str, Any], tokens: list[str], types: list[int], label: str) -> tuple[HFTokenizer, bool]:
    scores = _listed(meta, "tokenizer.ggml.scores", float, label) or [0.0] * len(tokens)
    if len(scores) != len(tokens):
        raise CorruptModel(f"{label}: {len(scores)} token scores for {len(tokens)} tokens")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    hf = HFTokenizer(models.BPE(vocab, _merges_by_score(tokens, types, scores, vocab), byte_fallback=True, fuse_unk=False))
    steps = [normalizers.Prepend(SPACE)] if meta.get("tokenizer.ggml.add_space_prefix", True) else []
    hf.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    hf.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return hf, True  # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise


def _merges_by_score(tokens: list[str], types: list[int], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split (a, b) of every mergeable token into two tokens, the best-scoring merged token first, which is
    the order llama.cpp's SentencePiece tokenizer merges in. (Two different tokens of equal score, competing in
    one text, are ordered here by id where llama.cpp takes the leftmost: benchmarks/real_models.py checks the
    real vocabularies against llama.cpp.)"""
    ranked = []
    for token_id, token in enumerate(tokens):
        if types[token_id] not in (NORMAL, UNUSED) or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[token_id], token_id, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


# tokenizer.ggml.model -> (the tokenizer, whether llama.cpp adds BOS when the file does not say)
VOCABULARY_KINDS: dict[str, Callable[[Mapping[str, Any], list[str], list[int], str], tuple[HFTokenizer, bool]]] = {
    "gpt2": _byte_level_bpe,
    "llama": _sentencepiece,
}


def _token_id(meta: Mapping[str, Any], key: str, size: int) -> int | None:
    value = meta.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < size else None


def _special_tokens(meta: Mapping[str, Any], tokens: list[str], default_bos: bool) -> SpecialTokens:
    bos, eos = (_token_id(meta, f"tokenizer.ggml.{k}_token_id", len(tokens)) for k in ("bos", "eos"))
    return SpecialTokens(
        bos_id=bos,
        eos_id=eos,
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)),  # llama.cpp: SentencePiece adds BOS
        bos_text=tokens[bos] if bos is not None else "",
        eos_text=tokens[eos] if eos is not None else "",
    )
