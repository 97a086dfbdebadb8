"""Weight sources: a model file's tensors under one canonical naming, read on demand.

Every format presents the same names — llama.cpp's, which are the same for every architecture
(`token_embd`, `blk.{i}.attn_q`, `blk.{i}.ffn_down`, `output_norm`, ...) — and the same conventions:
the q/k rows of each head in Hugging Face's rotate-half order, norm weights as the factor they multiply
by. What a format stores differently (GGUF's interleaved q/k rows for Llama, Gemma's `1 + w` norms in
safetensors) is undone by that format's reader, so the models never see where a tensor came from.

A source remembers which tensors were taken: the loader refuses a file whose tensors were not all used,
so a checkpoint with parts deskpod does not implement can never load silently wrong.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from deskpod.errors import CorruptModel, DeskpodError, UnsupportedModel
from deskpod.formats.spec import ModelSpec

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, eq=False)
class StoredTensor(ABC):
    """One tensor as its file holds it. `shape` is logical and in PyTorch order ([out, in] for a matrix)."""

    name: str  # canonical
    shape: tuple[int, ...]
    dtype: str  # ggml type ("Q4_K", "F32"), safetensors dtype ("BF16"), or a deskpod scheme ("nvfp4")
    nbytes: int  # as stored
    row_order: np.ndarray | None = None  # rows (dim 0) are read in this order
    stored_rows: int | None = None  # the rows the file holds, when only some are read (a linked box's share)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def file_name(self) -> str:
        """The name the file gives it, for messages."""
        return self.name

    def permute_rows(self, order: np.ndarray) -> StoredTensor:
        """The same tensor read with its rows in `order` (composed with any order it already has)."""
        current = self.row_order if self.row_order is not None else np.arange(self.rows)
        composed = current[np.asarray(order)]
        every_row = np.arange(self.stored_rows or self.rows)  # the order drops only when all rows are read in order
        return replace(self, row_order=None if np.array_equal(composed, every_row) else composed)

    @abstractmethod
    def float(self) -> torch.Tensor:
        """The values as float32, dequantized if need be."""

    def _ordered(self, t):
        return t if self.row_order is None else t[self.row_order]


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # the float types, named alike in GGUF and safetensors headers


@dataclass(frozen=True, eq=False)
class BlockTensor(StoredTensor):
    """A tensor in one of ggml's block-quantized types: `blocks()` gives the bytes as stored, a row of
    blocks per output row, for the kernels that compute on them directly."""

    @abstractmethod
    def blocks(self) -> np.ndarray:
        """[rows, bytes per row] uint8."""


@dataclass(frozen=True, eq=False)
class SchemeTensor(StoredTensor):
    """A weight in one of deskpod's quantization schemes: its parts (codes, scales) by ModelOpt's suffixes."""

    @abstractmethod
    def parts(self) -> dict[str, torch.Tensor]:
        """{"weight": codes, "weight_scale": ..., ...}; per-tensor (0-d) parts are not reordered."""


class WeightSource(ABC):
    """A model file's tensors by canonical name, and its spec. `take` marks a tensor used."""

    def __init__(self, label: str, spec: ModelSpec, tensors: dict[str, StoredTensor]):
        self.label = label  # how messages name the model: what the user typed, else the path
        self.spec = spec
        self._tensors = tensors
        self._taken: set[str] = set()

    @property
    @abstractmethod
    def format(self) -> str:
        """"gguf" or "safetensors"."""

    def names(self) -> list[str]:
        return list(self._tensors)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def info(self, name: str) -> StoredTensor:
        """The tensor's description, without marking it used."""
        try:
            return self._tensors[name]
        except KeyError:
            raise CorruptModel(f"{self.label}: tensor {name!r} is missing") from None

    def take(self, name: str) -> StoredTensor:
        tensor = self.info(name)
        self._taken.add(name)
        return tensor

    def take_optional(self, name: str) -> StoredTensor | None:
        return self.take(name) if self.has(name) else None

    def unused(self) -> list[str]:
        return [name for name in self._tensors if name not in self._taken]

    def tensors(self) -> Iterable[StoredTensor]:
        return self._tensors.values()


def open_weights(path: str | Path, label: str | None = None) -> WeightSource:
    """The weight source of a .gguf file or a Hugging Face safetensors folder."""
    from deskpod.formats.gguf import GGUFWeights
    from deskpod.formats.safetensors import SafetensorsWeights

    path = Path(path)
    if path.suffix == ".safetensors":
        raise UnsupportedModel(f"{label or path}: give the folder holding this file and its config.json, not the file")
    reader = SafetensorsWeights if path.is_dir() else GGUFWeights
    return reader(path, label or str(path))


def declared_architecture(path: str | Path) -> str | None:
    """The architecture a model file names (GGUF general.architecture, config.json model_type), read without
    the rest of its metadata; None when even that cannot be read."""
    from deskpod.formats.gguf import GGUFFile
    from deskpod.formats.safetensors import read_config

    try:
        if Path(path).is_dir():
            config = read_config(Path(path))
            text = config.get("text_config")
            return str((text if isinstance(text, dict) else {}).get("model_type") or config.get("model_type"))
        return GGUFFile(path).architecture
    except DeskpodError:
        return None


def spec_error(label: str, what: str, error: Exception) -> CorruptModel:
    return CorruptModel(f"{label}: {what} is incomplete or malformed ({error})")


