"""GGUF reading for the engine: metadata and tensors, memory-mapped, through the `gguf` package.

The `gguf` package parses the file and dequantizes every ggml type; deskpod only adds clear errors
(a broken file names itself) and hands raw quantized blocks to the kernels that can use them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deskpod.errors import CorruptModel

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class RawTensor:
    name: str
    ggml_type: str  # "F32", "Q4_1", ... (gguf.GGMLQuantizationType names)
    shape: tuple[int, ...]  # PyTorch order: (out_features, in_features) for a matrix
    data: np.ndarray  # the bytes (quantized) or values (float types) as stored, memory-mapped


class GGUFFile:
    """A GGUF file opened for reading. Raises CorruptModel naming the file when it cannot be read."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        _check_magic(self.path)
        try:
            self._reader = gguf.GGUFReader(self.path, "r")
        except Exception as e:  # the reader raises ValueError, IndexError, struct errors... on damage
            size = self.path.stat().st_size
            raise CorruptModel(f"{self.path}: truncated or damaged GGUF file ({size:,} bytes; {type(e).__name__}: {e})") from None
        self.metadata: dict[str, Any] = {
            name: field.contents() for name, field in self._reader.fields.items() if not name.startswith("GGUF.")
        }
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._check_tensor_data()

    def _check_tensor_data(self) -> None:
        size = self.path.stat().st_size
        for t in self._tensors.values():
            if t.data_offset + t.n_bytes > size:
                raise CorruptModel(
                    f"{self.path}: truncated: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes:,} "
                    f"but the file has {size:,} bytes"
                )

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def arch_value(self, key: str, default: Any = None) -> Any:
        """`<architecture>.<key>` from the metadata, e.g. arch_value("block_count")."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def has_tensor(self, name: str) -> bool:
        return name in self._tensors

    def raw(self, name: str) -> RawTensor:
        t = self._tensor(name)
        # GGUF lists dims innermost first; PyTorch wants outermost first.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        return RawTensor(name, t.tensor_type.name, shape, t.data)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32, in PyTorch dimension order (the `gguf` package's reference dequantization)."""
        from gguf.quants import dequantize

        t = self._tensor(name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        try:
            values = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CorruptModel(f"{self.path}: tensor {name!r} has type {t.tensor_type.name}, which deskpod cannot read")
        return np.asarray(values, dtype=np.float32).reshape(shape)

    def _tensor(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise CorruptModel(f"{self.path}: tensor {name!r} is missing") from None


def _check_magic(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CorruptModel(f"{path}: cannot open ({e.strerror})") from None
    if head != GGUF_MAGIC:
        raise CorruptModel(f"{path}: not a GGUF file (starts with {head!r}, expected {GGUF_MAGIC!r})")
