"""GGUF vocabularies as `tokenizers` tokenizers: SentencePiece ("llama": Gemma, Llama 2, Mistral) against a
plain-Python rendering of llama.cpp's algorithm on random text, and the special-token rules both kinds share.
(The real Gemma 3 and Qwen2.5 vocabularies are checked against llama.cpp itself in benchmarks/real_models.py.)"""

from __future__ import annotations

import random

import pytest

from deskpod.errors import UnsupportedModel
from deskpod.formats.gguf_tokenizer import BYTE, CONTROL, NORMAL, USER_DEFINED, vocabulary_from_gguf

SPACE = "\u2581"
PIECES = ["▁", "▁t", "he", "▁the", "▁a", "an", "▁an", "nd", "▁and", "at", "▁c", "▁cat", "ca", "th", "▁th", "e▁",
          "▁é", "t", "h", "e", "a", "n", "d", "c", "s", "▁s", "é", "▁ca"]
SPECIALS = [("<unk>", 2), ("<bos>", CONTROL), ("<eos>", CONTROL), ("<start_of_turn>", CONTROL)]


def spm_metadata(seed: int = 0, add_space_prefix: bool = False) -> dict:
    """A small SentencePiece vocabulary as a GGUF stores it: specials, 256 byte tokens, pieces with scores."""
    rng = random.Random(seed)
    tokens = [t for t, _ in SPECIALS] + [f"<0x{b:02X}>" for b in range(256)] + PIECES + ["\n\n"]
    types = [k for _, k in SPECIALS] + [BYTE] * 256 + [NORMAL] * len(PIECES) + [USER_DEFINED]
    scores = [0.0] * (len(SPECIALS) + 256) + [rng.uniform(-10, 0) for _ in PIECES] + [0.0]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.add_space_prefix": add_space_prefix}


def llama_cpp_spm(text: str, meta: dict) -> list[int]:
    """llama.cpp's llm_tokenizer_spm on text without special tokens: spaces become ▁ (and one leads the text
    with add_space_prefix), then the adjacent pair whose union is the best-scoring token merges, the leftmost
    on ties, until none is a token; what is left and not a token falls back to its UTF-8 bytes."""
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    ids = {t: i for i, t in enumerate(tokens) if meta["tokenizer.ggml.token_type"][i] in (NORMAL, 2)}
    symbols = list((" " if meta["tokenizer.ggml.add_space_prefix"] else "") + text.replace(" ", SPACE))
    symbols = [s.replace(" ", SPACE) for s in symbols]
    while True:
        pairs = [(scores[ids[a + b]], -i) for i, (a, b) in enumerate(zip(symbols, symbols[1:])) if a + b in ids]
        if not pairs:
            break
        i = -max(pairs)[1]
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    out = []
    for s in symbols:
        out += [ids[s]] if s in ids else [tokens.index(f"<0x{b:02X}>") for b in s.encode()]
    return out


@pytest.mark.parametrize("add_space_prefix", [False, True])
def test_sentencepiece_splits_as_llama_cpp(add_space_prefix):
    meta = spm_metadata(add_space_prefix=add_space_prefix)
    hf = vocabulary_from_gguf(meta, "spm").hf
    rng = random.Random(1)
    alphabet = "the cat and an é s  xy"  # pieces, bytes with no piece (x, y), a two-byte letter, double spaces
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))
        assert hf.encode(text, add_special_tokens=False).ids == llama_cpp_spm(text, meta), repr(text)


def test_sentencepiece_specials_and_decoding():
    vocabulary = vocabulary_from_gguf(spm_metadata(), "spm")
    hf, tokens = vocabulary.hf, spm_metadata()["tokenizer.ggml.tokens"]
    ids = hf.encode("<start_of_turn>the cat\n\nand", add_special_tokens=False).ids
    assert ids[0] == tokens.index("<start_of_turn>") and tokens.index("\n\n") in ids  # matched whole
    assert hf.decode(ids, skip_special_tokens=True) == "the cat\n\nand"
    assert hf.decode(hf.encode("x é", add_special_tokens=False).ids) == "x é"  # byte fallback decodes back
    assert vocabulary.special.add_bos and vocabulary.special.bos_text == "<bos>"  # SentencePiece adds BOS by default


def test_unknown_vocabulary_kinds_are_refused_by_name():
    with pytest.raises(UnsupportedModel, match="spm: tokenizer model 'rwkv'"):
        vocabulary_from_gguf({**spm_metadata(), "tokenizer.ggml.model": "rwkv"}, "spm")


# --- o200k (llama.cpp's "gpt-4o" pre-tokenizer: gpt-oss, gpt-4o) ------------------------------------------

O200K_TEXT = ("Hello World! I'M here, they'LL see: DON'T stop. HTTPServer's log/path\nx = 1234567 + 89;\r\n"
              "\tÉcole naïve Ünïcode 日本語のテキスト 123abc ABCdef   trailing   \n\n  -- end --//\n")


def o200k_reference(ranks: dict[bytes, int]):
    """tiktoken's own o200k_base definition (its pattern), over these ranks instead of the downloaded ones."""
    import tiktoken
    import tiktoken_ext.openai_public as public

    original, public.load_tiktoken_bpe = public.load_tiktoken_bpe, lambda *args, **kwargs: ranks
    try:
        spec = public.o200k_base()
    finally:
        public.load_tiktoken_bpe = original
    return tiktoken.Encoding("o200k-small", pat_str=spec["pat_str"], mergeable_ranks=spec["mergeable_ranks"],
                             special_tokens={})


def test_gpt_4o_pre_tokenizer_splits_as_tiktoken_does():
    """A byte-level BPE trained here, as a GGUF holds it (pre "gpt-4o") and as tiktoken ranks the same merges:
    both give the same tokens for text with cases, contractions, digits, newlines, slashes and non-Latin
    scripts — the pre-tokenizer is o200k's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(r"\s+|\w+|[^\w\s]+", behavior="isolated"), byte_level])
    trained.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    trained.train_from_iterator([O200K_TEXT.lower(), O200K_TEXT] * 30, trainer)
    model = __import__("json").loads(trained.to_str())["model"]
    vocab, merges = model["vocab"], [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-4o", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [NORMAL] * len(tokens), "tokenizer.ggml.merges": merges}
    ours = vocabulary_from_gguf(meta, "o200k-small").hf

    to_bytes = {c: b for b, c in zip(range(256), _byte_level_alphabet())}
    as_bytes = [bytes(to_bytes[c] for c in t) for t in tokens]
    singles = sorted(b for b in as_bytes if len(b) == 1)
    ranks = {b: i for i, b in enumerate(singles)}
    for merge in merges:
        a, b = merge.split(" ")
        ranks.setdefault(bytes(to_bytes[c] for c in a + b), len(ranks))
    reference = o200k_reference(ranks)
    for text in (O200K_TEXT, O200K_TEXT.upper(), "x" + O200K_TEXT.swapcase()):
        mine = [as_bytes[i] for i in ours.encode(text, add_special_tokens=False).ids]
        theirs = [reference.decode_single_token_bytes(i) for i in reference.encode_ordinary(text)]
        assert b"".join(mine) == text.encode()
        assert mine == theirs


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte -> character table, in byte order (what byte-level BPE tokens are written in)."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in visible:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]
