"""Tokenizer built from GGUF metadata or a Hugging Face folder with the `tokenizers` library, and
streaming detokenization."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from deskpod.engine.chat_template import render_chat
from deskpod.errors import CorruptModel, UnsupportedModel
from deskpod.formats.gguf import GGUFFile

# Tokens that end a turn in the common chat formats: generation stops at them as at EOS.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>")

# ggml token types (llama.cpp's llama_token_type): these are matched whole in text, not split by BPE.
CONTROL, USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2():
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _split_then_bytes(pattern: str):
    def build():
        split = pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    return build


# tokenizer.ggml.pre → the same pre-tokenization llama.cpp applies (llama-vocab.cpp's regex table).
PRE_TOKENIZERS = {
    "default": _gpt2,
    "gpt-2": _gpt2,
    "gpt2": _gpt2,
    "mpt": _gpt2,
    "olmo": _gpt2,
    "smollm": _digits_then_gpt2,
    "starcoder": _digits_then_gpt2,
    "refact": _digits_then_gpt2,
    "codeshell": _digits_then_gpt2,
    "llama-bpe": _split_then_bytes(_LLAMA3_SPLIT),
    "llama3": _split_then_bytes(_LLAMA3_SPLIT),
    "qwen2": _split_then_bytes(_QWEN2_SPLIT),
}


@dataclass(frozen=True)
class SpecialTokens:
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    bos_text: str
    eos_text: str


class Tokenizer:
    """Text ↔ token ids for one model. `encode` parses special tokens written in the text (as llama.cpp does
    for a rendered chat prompt)."""

    def __init__(self, hf: HFTokenizer, special: SpecialTokens, chat_template: str | None, eog_ids: frozenset[int]):
        self._hf = hf
        self.special = special
        self.chat_template = chat_template
        self.eog_ids = eog_ids  # ids that end generation (EOS, <|im_end|>, <|eot_id|>...)
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> Tokenizer:
        meta = gguf.metadata
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UnsupportedModel(
                f"{gguf.path}: tokenizer model {kind!r} is not supported yet (supported: 'gpt2' byte-level BPE)"
            )
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise UnsupportedModel(
                f"{gguf.path}: pre-tokenizer {pre!r} is not supported (supported: {', '.join(sorted(PRE_TOKENIZERS))})"
            )
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        vocab = {tok: i for i, tok in enumerate(tokens)}
        hf = HFTokenizer(models.BPE(vocab, merges, ignore_merges=False))
        hf.pre_tokenizer = PRE_TOKENIZERS[pre]()
        hf.decoder = decoders.ByteLevel()
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        hf.add_special_tokens(
            [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)]
        )
        special = _special_tokens(meta, tokens)
        eog = {i for i in (special.eos_id, meta.get("tokenizer.ggml.eot_token_id")) if i is not None}
        eog |= {vocab[t] for t in END_OF_TURN if t in vocab}
        return cls(hf, special, meta.get("tokenizer.chat_template"), frozenset(eog))

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        """A Hugging Face folder: tokenizer.json, tokenizer_config.json (chat template, bos/eos, add_bos_token)
        and generation_config.json (eos_token_id, one id or a list: every one ends generation)."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise UnsupportedModel(f"{folder}: no tokenizer.json (deskpod reads fast tokenizers only)")
        try:
            hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception on bad JSON
            raise CorruptModel(f"{folder / 'tokenizer.json'}: cannot be read ({e})") from None
        config, generation = _json_or_empty(folder / "tokenizer_config.json"), _json_or_empty(folder / "generation_config.json")
        bos_text, eos_text = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        special = SpecialTokens(
            bos_id=hf.token_to_id(bos_text) if bos_text else None,
            eos_id=hf.token_to_id(eos_text) if eos_text else None,
            add_bos=bool(config.get("add_bos_token", False)),
            bos_text=bos_text,
            eos_text=eos_text,
        )
        listed = generation.get("eos_token_id")
        eog = set(listed if isinstance(listed, list) else [listed] if listed is not None else [])
        eog |= {i for t in END_OF_TURN if (i := hf.token_to_id(t)) is not None}
        eog |= {special.eos_id} if special.eos_id is not None else set()
        return cls(hf, special, config.get("chat_template"), frozenset(eog))

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json so that from_folder() gives this tokenizer back;
        the end-of-generation ids go to generation_config.json, which the model's writer owns."""
        folder = Path(folder)
        self._hf.save(str(folder / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.special.bos_text or None,
            "eos_token": self.special.eos_text or None,
            "add_bos_token": self.special.add_bos,
            "chat_template": self.chat_template,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self._hf.encode(text, add_special_tokens=False).ids
        add_bos = self.special.add_bos if add_bos is None else add_bos
        if add_bos and self.special.bos_id is not None and ids[:1] != [self.special.bos_id]:
            ids = [self.special.bos_id] + ids
        return ids

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """The prompt ids for a conversation, ready for the assistant's reply (the model's template,
        rendered in the sandbox)."""
        text = render_chat(self.chat_template, messages, bos_token=self.special.bos_text, eos_token=self.special.eos_text)
        return self.encode(text)

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self._hf.decode(ids, skip_special_tokens=skip_special)

    def token_text(self, token_id: int) -> str:
        return self._hf.decode([token_id], skip_special_tokens=False)


def _special_tokens(meta: dict, tokens: list[str]) -> SpecialTokens:
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return SpecialTokens(
        bos_id=bos,
        eos_id=eos,
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        bos_text=tokens[bos] if bos is not None else "",
        eos_text=tokens[eos] if eos is not None else "",
    )


def _json_or_empty(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptModel(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _token_text(token) -> str:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else ""


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting a multi-byte character.

    Decoding each token alone breaks UTF-8 characters spread over several byte-level tokens, so we decode a
    short window and emit only the part that is complete (vLLM's prefix/read offset scheme)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the window we decode
        self._read = 0  # end of the text already emitted, as an index into ids
        self.text = ""

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        new_text = self._tok.decode(self._ids[self._prefix :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        delta = new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta
