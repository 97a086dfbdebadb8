"""The BERT encoder and sentence pipeline on the real all-MiniLM-L6-v2, against transformers' vectors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from deskpod.embed.embedder import SentenceEmbedder
from deskpod.errors import UnsupportedModel

REFERENCE = Path(__file__).parents[1] / "data" / "minilm-reference.json"


@pytest.fixture(scope="module")
def embedder(minilm_dir: Path) -> SentenceEmbedder:
    return SentenceEmbedder(minilm_dir)


def _cosine(a: list[float], b: list[float]) -> float:
    return float(torch.nn.functional.cosine_similarity(torch.tensor(a), torch.tensor(b), dim=0))


def test_matches_transformers_reference(embedder: SentenceEmbedder) -> None:
    reference = json.loads(REFERENCE.read_text())  # benchmarks/embeddings_reference.py
    out = embedder.embed(reference["sentences"])
    for got, want in zip(out, reference["embeddings"], strict=True):
        assert len(got.vector) == len(want) == 384
        assert _cosine(got.vector, want) >= 0.999


def test_vectors_are_unit_length_and_independent_of_batching(embedder: SentenceEmbedder) -> None:
    texts = ["a short one", "a much longer sentence that needs many more tokens than the first one does"]
    batched = embedder.embed(texts)
    alone = [embedder.embed([t])[0] for t in texts]  # no padding at all
    for b, a in zip(batched, alone, strict=True):
        assert torch.tensor(b.vector).norm().item() == pytest.approx(1.0, abs=1e-5)
        assert _cosine(b.vector, a.vector) > 0.99999
        assert b.num_tokens == a.num_tokens


def test_long_input_is_truncated_at_max_seq_length(embedder: SentenceEmbedder) -> None:
    (out,) = embedder.embed(["word " * 1000])
    assert out.num_tokens == embedder.max_tokens == 256  # sentence_bert_config.json


def test_unsupported_pooling_is_refused(minilm_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "minilm"
    shutil.copytree(minilm_dir, folder)  # copies the files the store's snapshot links to
    pooling = folder / "1_Pooling" / "config.json"
    pooling.unlink()  # the copy keeps the blob's read-only mode: replace it rather than write into it
    pooling.write_text(json.dumps({"pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True}))
    with pytest.raises(UnsupportedModel, match="pooling"):
        SentenceEmbedder(folder)
