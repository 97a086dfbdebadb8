"""The tokenizer built from GGUF metadata reproduces llama.cpp's token ids, and streams text whole characters
at a time."""

from __future__ import annotations

import pytest

from deskpod.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from deskpod.errors import UnsupportedModel
from deskpod.formats.gguf import GGUFFile

MULTI_BYTE = "L'aujourcé! 日本語 🙂 — naïve café"


def results(reference, mode):
    return [r for r in reference["results"] if r["mode"] == mode]


# --- SmolLM2 against llama.cpp ------------------------------------------------------------------


def test_chat_prompt_ids_match_llama_cpp(smollm2_tokenizer, reference):
    # the rendering itself is checked in test_chat_template.py, the whole chain in test_llm.py
    for r in results(reference, "chat"):
        assert smollm2_tokenizer.encode(r["rendered_prompt"]) == r["prompt_token_ids"]


def test_raw_prompt_ids_match_llama_cpp(smollm2_tokenizer, reference):
    for r in results(reference, "raw"):
        assert smollm2_tokenizer.encode(r["prompt"]) == r["prompt_token_ids"]


def test_decode_matches_llama_cpp_text(smollm2_tokenizer, reference):
    for r in reference["results"]:
        assert smollm2_tokenizer.decode(r["completion_token_ids"]) == r["completion_text"]
        pieces = [smollm2_tokenizer.token_text(t) for t in r["completion_token_ids"]]
        assert pieces == r["completion_token_pieces"]


def test_special_tokens_and_end_of_generation(smollm2_tokenizer, reference):
    tok, want = smollm2_tokenizer, reference["special_tokens"]
    assert (tok.special.bos_id, tok.special.eos_id) == (want["bos_id"], want["eos_id"])
    assert (tok.special.bos_text, tok.special.eos_text) == ("<|im_start|>", "<|im_end|>")
    assert want["eos_id"] in tok.eog_ids
    # control tokens written in the text are parsed whole, and left out of decoded text
    assert tok.encode("<|im_end|>") == [want["eos_id"]]
    assert tok.decode([want["bos_id"], 504, want["eos_id"]]) == "The"
    assert tok.decode([want["bos_id"], 504], skip_special=False) == "<|im_start|>The"


def test_digits_are_split_one_by_one(smollm2_tokenizer):
    # SmolLM2's pre-tokenizer ("smollm") splits numbers into single digits, as the reference's "311" shows
    ids = smollm2_tokenizer.encode(" 2024")
    assert [smollm2_tokenizer.token_text(i) for i in ids] == [" ", "2", "0", "2", "4"]


@pytest.mark.parametrize("text", [MULTI_BYTE, "", "   spaces  and\n\nnewlines\t", "<|im_start|>user\nhé<|im_end|>"])
def test_encode_decode_round_trip(smollm2_tokenizer, text):
    assert smollm2_tokenizer.decode(smollm2_tokenizer.encode(text), skip_special=False) == text


# --- streaming detokenization -------------------------------------------------------------------


def stream_text(tok: Tokenizer, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    assert detok.text == "".join(deltas)
    return deltas


def test_incremental_text_equals_decode_and_never_splits_a_character(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode(MULTI_BYTE)
    assert len(ids) > len(MULTI_BYTE.split())  # several tokens, some of them parts of one character
    deltas = stream_text(smollm2_tokenizer, ids)
    assert "".join(deltas) == smollm2_tokenizer.decode(ids) == MULTI_BYTE
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # at least one token ended inside a character and had to wait


def test_incremental_text_of_a_real_completion(smollm2_tokenizer, reference):
    for r in reference["results"]:
        deltas = stream_text(smollm2_tokenizer, r["completion_token_ids"])
        assert "".join(deltas) == r["completion_text"]


def test_emoji_split_over_byte_tokens_waits_for_its_last_byte(tiny_llama_gguf):
    # the tiny vocabulary has no merges over these bytes: 🙂 is four one-byte tokens
    tok = Tokenizer.from_gguf(GGUFFile(tiny_llama_gguf))
    ids = tok.encode("a🙂b")
    assert len(ids) == 6
    assert stream_text(tok, ids) == ["a", "", "", "", "🙂", "b"]


# --- the tiny vocabulary: BPE merges and metadata -----------------------------------------------


def test_merges_apply_in_rank_order(tiny_llama_gguf, tiny_tokens):
    tok = Tokenizer.from_gguf(GGUFFile(tiny_llama_gguf))

    def pieces(text: str) -> list[str]:
        return [tiny_tokens[i] for i in tok.encode(text)]

    assert pieces(" the") == ["Ġthe"]  # h+e, then Ġ+t, then Ġt+he
    assert pieces("the inner") == ["t", "he", "Ġ", "in", "n", "er"]
    assert pieces("<|im_start|>user<|im_end|>") == ["<|im_start|>", "u", "s", "er", "<|im_end|>"]
    assert tok.eog_ids == frozenset({tiny_tokens.index("<|im_end|>")})


@pytest.mark.parametrize("option", [{"tokenizer_model": "bert"}, {"pre": "klingon"}])
def test_unsupported_tokenizers_are_refused_by_name(make_tiny_llama, option):
    path = make_tiny_llama(**option)
    [name] = option.values()
    with pytest.raises(UnsupportedModel, match=f"'{name}'") as e:
        Tokenizer.from_gguf(GGUFFile(path))
    assert str(path) in str(e.value)
