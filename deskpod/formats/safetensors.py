"""A Hugging Face model folder for reading: config.json plus the tensors of every *.safetensors shard.

Headers are parsed once (8-byte length + JSON) so sizes and dtypes are known before any weight is
read; tensors come from the `safetensors` package, memory-mapped. A broken file names itself.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deskpod.errors import CorruptModel, UnsupportedModel

if TYPE_CHECKING:  # header reading stays light: `deskpod list` reads metadata without torch
    import torch

# safetensors dtype names -> bytes per element
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    dtype: str  # safetensors' name: "F32", "BF16", "F8_E4M3", "U8", ...
    shape: tuple[int, ...]

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def n_bytes(self) -> int:
        return self.n_elements * DTYPE_BYTES.get(self.dtype, 1)


class SafetensorsFolder:
    """config.json and the tensors of a model folder (one model.safetensors or several shards)."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder)
        self.config = read_config(self.path)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise UnsupportedModel(f"{self.path}: no *.safetensors weights in this folder")
        self.entries: dict[str, TensorEntry] = {}
        for file in files:
            self.entries.update(read_header(file))
        self._handles: dict[Path, Any] = {}

    def has(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> torch.Tensor:
        """The tensor as stored (its own dtype), memory-mapped where the dtype allows."""
        entry = self.entries.get(name)
        if entry is None:
            raise CorruptModel(f"{self.path}: tensor {name!r} is missing")
        if entry.file not in self._handles:
            from safetensors import safe_open

            self._handles[entry.file] = safe_open(str(entry.file), framework="pt")
        return self._handles[entry.file].get_tensor(name)


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise UnsupportedModel(f"{folder}: a safetensors model folder needs a config.json")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptModel(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CorruptModel(f"{path}: expected a JSON object")
    return config


def read_header(file: Path) -> dict[str, TensorEntry]:
    """Every tensor's dtype and shape from the header alone; CorruptModel when it is truncated or malformed."""
    size = file.stat().st_size
    with file.open("rb") as f:
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < n <= size - 8:
            raise CorruptModel(f"{file}: truncated safetensors (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptModel(f"{file}: safetensors header is not valid JSON ({e})") from None
    entries = {}
    try:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["data_offsets"][1] > size - 8 - n:
                raise CorruptModel(f"{file}: truncated safetensors: tensor {name!r} ends past the end of the file")
            entries[name] = TensorEntry(name, file, str(info["dtype"]), tuple(int(d) for d in info["shape"]))
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise CorruptModel(f"{file}: malformed safetensors header ({type(e).__name__}: {e})") from None
    return entries
