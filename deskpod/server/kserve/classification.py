"""Triton's classification extension: an output asked for with `classification: k` comes back as the top k
classes of each batch item, as BYTES strings "<score>:<index>" — "<score>:<index>:<label>" when the model's
config names a `label_filename` for that output (one label per line, in the model's folder) — best first,
the scores written as Triton writes them (six decimals)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from deskpod.backends.types import InferResponse
from deskpod.errors import InvalidRequest


def check_k(name: str, value) -> int:
    """The k of an output's `classification` parameter; InvalidRequest unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"output `{name}`: `classification` must be an integer >= 1 (the classes to return), "
                             f"got {value!r}")
    return value


def top_classes(scores: np.ndarray, k: int, batched: bool, labels: list[str] | None) -> np.ndarray:
    """[batch, k] (or [k] unbatched) BYTES: each item's k best classes over its flattened scores."""
    if scores.dtype.kind not in "iuf":
        raise InvalidRequest(f"classification needs numeric scores, the output holds {scores.dtype}")
    rows = scores.reshape(scores.shape[0], -1) if batched and scores.ndim > 0 else scores.reshape(1, -1)
    k = min(k, rows.shape[1])
    out = np.empty((len(rows), k), dtype=object)
    for b, row in enumerate(rows):
        for j, index in enumerate(np.argsort(-row.astype(np.float64), kind="stable")[:k]):
            label = f":{labels[index]}" if labels and index < len(labels) else ""
            out[b, j] = f"{float(row[index]):f}:{index}{label}".encode()
    return out if batched else out[0]


def classify(response: InferResponse, wanted: Mapping[str, int], batched: bool,
             labels: Mapping[str, list[str]]) -> InferResponse:
    """The response with each output in `wanted` replaced by its top classes."""
    outputs = dict(response.outputs)
    for name, k in wanted.items():
        if name not in outputs:
            raise InvalidRequest(f"output `{name}`: asked for its classification, but it is not among the outputs")
        outputs[name] = top_classes(outputs[name], k, batched, labels.get(name))
    return dataclasses.replace(response, outputs=outputs)


def read_labels(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()
