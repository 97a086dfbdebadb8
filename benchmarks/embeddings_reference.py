"""Reference sentence embeddings of all-MiniLM-L6-v2 from Hugging Face transformers, for deskpod's tests.

    benchmarks/.venv-peers/bin/python benchmarks/embeddings_reference.py MINILM_FOLDER [--out FILE]

MINILM_FOLDER is the store's minilm snapshot, printed by
`python -c "from deskpod.store import Store; print(Store().model_dir(Store().ensure('minilm')))"`;
FILE defaults to tests/data/minilm-reference.json.
transformers' BertModel runs the folder's weights; the pooling is sentence-transformers' own for this
model (modules.json: Transformer, mean Pooling, Normalize): the mean of the last hidden states over the
attention mask, then L2 normalisation. Inputs are truncated at sentence_bert_config.json's max_seq_length.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, BertModel

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "deskpod serves models from one box to everyone in the house.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar — and oxygen!",
]


def embed(folder: Path, sentences: list[str]) -> torch.Tensor:
    max_len = json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = BertModel.from_pretrained(folder, add_pooling_layer=False, use_safetensors=True).eval()
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # [B, T, H]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parents[1] / "tests" / "data" / "minilm-reference.json"
    )
    args = parser.parse_args()
    vectors = embed(args.folder, SENTENCES)
    reference = {
        "description": "all-MiniLM-L6-v2 sentence embeddings (mean pooling + L2 normalisation) from transformers' "
        "BertModel, float32, CPU; written by benchmarks/embeddings_reference.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "sentences": SENTENCES,
        "embeddings": [[round(x, 7) for x in v] for v in vectors.tolist()],
    }
    args.out.write_text(json.dumps(reference, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(SENTENCES)} vectors of {vectors.shape[1]} dims to {args.out}")


if __name__ == "__main__":
    main()
