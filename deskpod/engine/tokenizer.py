"""Tokenizer: text ↔ token ids for one model, built from GGUF metadata (deskpod.formats.gguf_tokenizer) or a
Hugging Face folder with the `tokenizers` library; chat templates; streaming detokenization."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from deskpod.engine.chat_template import CHATML, render_chat
from deskpod.errors import CorruptModel, DeskpodError, InvalidRequest, PromptTooLong, UnsupportedModel
from deskpod.formats.gguf import GGUFFile
from deskpod.formats.gguf_tokenizer import END_OF_TURN, SpecialTokens, Vocabulary, vocabulary_from_gguf

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
SURROGATE = re.compile("[\ud800-\udfff]")  # half of a UTF-16 pair: valid in a Python str, not in Unicode text


class NoChatTemplate(DeskpodError):
    """The model carries no chat template (a base model): prompt it with raw text instead."""


class Tokenizer:
    """Text ↔ token ids for one model. `encode` parses special tokens written in the text (as llama.cpp does
    for a rendered chat prompt)."""

    def __init__(self, vocabulary: Vocabulary):
        self.vocabulary = vocabulary
        self._hf = vocabulary.hf
        self.special = vocabulary.special
        self.chat_template = vocabulary.chat_template
        self.eog_ids = vocabulary.eog_ids  # ids that end generation (EOS, <|im_end|>, <|eot_id|>...)
        self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> Tokenizer:
        return cls(vocabulary_from_gguf(gguf.metadata, gguf.label))

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        """A Hugging Face folder: tokenizer.json, tokenizer_config.json (chat template — or chat_template.jinja
        beside it —, bos/eos, add_bos_token) and generation_config.json (eos_token_id, one id or a list: every one ends generation)."""
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
        template = config.get("chat_template")
        if template is None and (folder / "chat_template.jinja").is_file():  # where newer transformers saves it
            template = (folder / "chat_template.jinja").read_text()
        return cls(Vocabulary(hf, special, template, frozenset(eog)))

    def save(self, folder: str | Path) -> None:
        """Write what from_folder() reads back as this tokenizer."""
        self.vocabulary.save(folder)

    @property
    def has_chat_template(self) -> bool:
        """A template of its own, or ChatML's tokens in its vocabulary (then ChatML is the template)."""
        return bool(self.chat_template) or all(self._hf.token_to_id(t) is not None for t in CHATML_TOKENS)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """No token stands for more characters than this (its vocabulary string is at least as long as its
        text): a text longer than limit * this cannot fit `limit` tokens."""
        return max((len(t) for t in self._hf.get_vocab(with_added_tokens=True)), default=1)

    def encode(self, text: str, add_bos: bool | None = None, limit: int | None = None) -> list[int]:
        """`limit`: a context size; a text that cannot fit it is refused (PromptTooLong) before tokenizing it."""
        if limit is not None and len(text) > limit * self.max_token_chars:
            raise PromptTooLong(f"the text has {len(text):,} characters, more than {limit:,} tokens of this model can "
                                "hold: shorten it")
        if (lone := SURROGATE.search(text)) is not None:
            raise InvalidRequest(f"the text holds a lone surrogate (U+{ord(lone.group()):04X} at character {lone.start()}), "
                                 "which is not Unicode text: encode it as UTF-8 properly")
        ids = self._hf.encode(text, add_special_tokens=False).ids
        add_bos = self.special.add_bos if add_bos is None else add_bos
        if add_bos and self.special.bos_id is not None and ids[:1] != [self.special.bos_id]:
            ids = [self.special.bos_id] + ids
        return ids

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            continue_final_message: bool = False, template: str | None = None,
                            add_bos: bool | None = None, limit: int | None = None, **variables) -> list[int]:
        """The prompt ids for a conversation (the model's template, or `template`, rendered in the sandbox);
        NoChatTemplate for a model that has none. `continue_final_message`: the prompt ends inside the last
        (assistant) message, for the model to go on with it; `variables`: more of the template's inputs
        (tools, enable_thinking...); `add_bos`: None adds the BOS as llama.cpp does for a chat (when the
        model asks for one and the template did not write it), True whenever the template did not write
        it, False never."""
        if template is None and not self.has_chat_template:
            raise NoChatTemplate(
                "this model has no chat template (it is a base model, not a chat model): send it raw text "
                "(/v1/completions, or `deskpod run --raw`)"
            )
        text = render_chat(template or self.chat_template or CHATML, messages, bos_token=self.special.bos_text,
                           eos_token=self.special.eos_text, add_generation_prompt=add_generation_prompt, **variables)
        if continue_final_message:
            text = _cut_after(text, messages[-1].get("content") or "")
        return self.encode(text, add_bos=add_bos, limit=limit)

    def special_texts(self) -> set[str]:
        """The texts of the tokens a decode with skip_special leaves out."""
        return {t.content for t in self._hf.get_added_tokens_decoder().values() if t.special}

    def vocabulary_ids(self) -> dict[str, int]:
        """Every token (added ones included) and its id: two tokenizers with equal ones give the same ids."""
        return self._hf.get_vocab(with_added_tokens=True)

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self._hf.decode(ids, skip_special_tokens=skip_special)

    def token_text(self, token_id: int) -> str:
        return self._hf.decode([token_id], skip_special_tokens=False)


def _cut_after(text: str, final: str) -> str:
    """The rendered conversation up to the end of its final message's text (transformers' rule for
    continue_final_message): whatever the template writes after it (end of turn...) is cut."""
    at = text.rfind(final.strip()) if final.strip() else -1
    if at < 0:
        raise InvalidRequest("continue_final_message: the chat template does not show the last message's text as "
                             "sent, so the prompt cannot end inside it")
    return text[: at + len(final.strip())]


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

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self._tok = tokenizer
        self._skip_special = skip_special
        self._ids: list[int] = []
        self._prefix = 0  # start of the window we decode
        self._read = 0  # end of the text already emitted, as an index into ids
        self.text = ""

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read], self._skip_special)
        new_text = self._tok.decode(self._ids[self._prefix :], self._skip_special)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        delta = new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta
