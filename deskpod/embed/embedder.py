"""Sentence embeddings from a sentence-transformers folder: tokenize, encode with BERT, pool, normalise.

The folder says what to do: `modules.json` lists the stages (Transformer, Pooling, optionally Normalize),
`1_Pooling/config.json` the pooling mode and `sentence_bert_config.json` the longest input in tokens.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from deskpod.embed.bert import Bert, load_bert
from deskpod.errors import UnsupportedModel


def _mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # hidden: [B, T, H], mask: [B, T] -> [B, H], the average over real tokens
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def _cls(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden[:, 0]


POOLING = {"pooling_mode_mean_tokens": _mean, "pooling_mode_cls_token": _cls}


@dataclass(frozen=True)
class Embedding:
    vector: list[float]
    num_tokens: int


class SentenceEmbedder:
    """`embed(texts)` -> one vector per text. Thread-safe: one batch at a time."""

    def __init__(self, folder: Path, max_batch: int = 32):
        folder = Path(folder)
        self.model: Bert = load_bert(folder)
        self.dim = self.model.config.hidden_size
        self.max_tokens = _max_seq_length(folder, self.model.config.max_position_embeddings)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()  # the file may pad every input to a fixed length; we pad per batch
        self.tokenizer.enable_truncation(self.max_tokens)
        self.tokenizer.enable_padding(pad_id=self.tokenizer.token_to_id("[PAD]") or 0)
        self.pool, self.normalize = _pipeline(folder)
        self.max_batch = max_batch
        self._lock = threading.Lock()

    def embed(self, texts: list[str]) -> list[Embedding]:
        out: list[Embedding] = []
        for i in range(0, len(texts), self.max_batch):
            out += self._embed_batch(texts[i : i + self.max_batch])
        return out

    def _embed_batch(self, texts: list[str]) -> list[Embedding]:
        encodings = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encodings])  # [B, T]
        mask = torch.tensor([e.attention_mask for e in encodings])
        types = torch.tensor([e.type_ids for e in encodings])
        with self._lock:
            vectors = self.pool(self.model(ids, mask, types), mask)  # [B, H]
        if self.normalize:
            vectors = F.normalize(vectors, dim=-1)
        counts = mask.sum(1).tolist()
        return [Embedding(v, n) for v, n in zip(vectors.tolist(), counts, strict=True)]


def _max_seq_length(folder: Path, limit: int) -> int:
    config = folder / "sentence_bert_config.json"
    if config.is_file():
        return min(int(json.loads(config.read_text()).get("max_seq_length", limit)), limit)
    return limit


def _pipeline(folder: Path):
    """(pooling function, normalise?) from modules.json; mean pooling and no normalisation without one."""
    modules_file = folder / "modules.json"
    modules = json.loads(modules_file.read_text()) if modules_file.is_file() else []
    kinds = {m["type"].rsplit(".", 1)[-1]: m for m in modules}
    pool = _mean
    if "Pooling" in kinds:
        config = json.loads((folder / kinds["Pooling"]["path"] / "config.json").read_text())
        modes = [k for k, on in config.items() if k.startswith("pooling_mode") and on]
        if len(modes) != 1 or modes[0] not in POOLING:
            raise UnsupportedModel(f"{folder}: pooling {modes} is not supported (supported: {', '.join(POOLING)})")
        pool = POOLING[modes[0]]
    unknown = set(kinds) - {"Transformer", "Pooling", "Normalize"}
    if unknown:
        raise UnsupportedModel(f"{folder}: sentence-transformers modules {sorted(unknown)} are not supported")
    return pool, "Normalize" in kinds
