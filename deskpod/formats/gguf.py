"""GGUF reading for all of deskpod (engine, store, planner): metadata (the header, memory-mapped) and tensors
(read into memory of their own when asked for).

The header is parsed here; tensor types, block sizes and dequantization come from the `gguf` package.
A broken file names itself (CorruptModel), and raw quantized blocks go to the kernels that use them as they are.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from deskpod.errors import CorruptModel
from deskpod.formats.spec import ModelSpec, SpecError, spec_from_gguf
from deskpod.formats.weights import FLOAT_DTYPES, BlockTensor, SchemeTensor, StoredTensor, WeightSource, spec_error

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class RawTensor:
    name: str
    ggml_type: str  # "F32", "Q4_1", ... (gguf.GGMLQuantizationType names)
    shape: tuple[int, ...]  # PyTorch order: (out_features, in_features) for a matrix
    data: np.ndarray  # the bytes (quantized) or values (float types) as stored, memory-mapped


class TensorInfo(NamedTuple):
    """A tensor as the header describes it; no tensor data is read."""

    name: str
    ggml_type: str  # gguf.GGMLQuantizationType name
    shape: tuple[int, ...]  # PyTorch order
    n_bytes: int
    n_elements: int


class GGUFFile:
    """A GGUF file opened for reading. Raises CorruptModel naming the file when it cannot be read.

    The header is parsed here rather than with `gguf.GGUFReader`, which builds several numpy objects
    per vocabulary entry: for a 49k-token vocabulary that is 3 s and 170 MB before any weight is read.
    Types, block sizes and dequantization still come from the `gguf` package."""

    def __init__(self, path: str | Path, label: str | None = None):
        self.path = Path(path)
        self.label = label or str(path)  # how errors name it: the model as the user typed it, else the path
        _check_magic(self.path, self.label)
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        try:
            self.metadata, self._tensors = _Header(self._data).parse()
        except (struct.error, IndexError, ValueError, KeyError, UnicodeDecodeError, OverflowError, MemoryError) as e:
            raise CorruptModel(
                f"{self.label}: truncated or damaged GGUF header ({self._data.size:,} bytes; {type(e).__name__}: {e})"
            ) from None
        self._check_tensor_data()

    def _check_tensor_data(self) -> None:
        for name, info in self._tensors.items():
            if info.offset + info.n_bytes > self._data.size:
                raise CorruptModel(
                    f"{self.label}: truncated: tensor {name!r} ends at byte {info.offset + info.n_bytes:,} "
                    f"but the file has {self._data.size:,} bytes"
                )

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture") or "unknown")

    def arch_value(self, key: str, default: Any = None) -> Any:
        """`<architecture>.<key>` from the metadata, e.g. arch_value("block_count")."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def has_tensor(self, name: str) -> bool:
        return name in self._tensors

    def tensors(self) -> Iterator[TensorInfo]:
        """Every tensor's name, type, shape and size, in file order."""
        for name, info in self._tensors.items():
            yield TensorInfo(name, info.ggml_type, info.shape, info.n_bytes, math.prod(info.shape))

    def raw(self, name: str, expert: int | None = None) -> RawTensor:
        """The tensor as stored, read into memory of its own: values for plain float types, bytes [rows,
        row_bytes] for block types. (Read, not mapped: the model keeps these bytes, and pages of a mapping
        would count a second time in the process's resident memory while loading.) `expert`: only that
        slice of a stacked [experts, rows, cols] tensor is read."""
        info = self._tensor(name)
        offset, n_bytes, shape = info.extent(expert)
        with open(self.path, "rb") as f:
            f.seek(offset)
            data = np.fromfile(f, dtype=np.uint8, count=n_bytes)
        if data.size != n_bytes:
            raise CorruptModel(f"{self.label}: tensor {name!r} could not be read whole ({data.size} of {n_bytes} bytes)")
        rows = int(np.prod(shape[:-1]))
        if info.ggml_type in PLAIN_TYPES:
            data = data.view(PLAIN_TYPES[info.ggml_type]).reshape(shape)
        else:
            data = data.reshape(rows, -1)
        return RawTensor(name, info.ggml_type, shape, data)

    def mapped(self, name: str, expert: int | None = None) -> np.ndarray:
        """A block-type tensor's bytes [rows, row_bytes] (or one expert's slice) as a view of the file's mapping,
        for a reader that copies them at once (ggml.BlockWeight releases each part of the mapping it copied)."""
        offset, n_bytes, shape = self._tensor(name).extent(expert)
        return self._data[offset : offset + n_bytes].reshape(int(np.prod(shape[:-1])), -1)

    def dequantize(self, name: str, expert: int | None = None) -> np.ndarray:
        """The tensor (or one expert's slice) as float32, in PyTorch dimension order (the `gguf` package's
        reference dequantization)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        raw = self.raw(name, expert)
        try:
            values = dequantize(raw.data, GGMLQuantizationType[raw.ggml_type])
        except NotImplementedError:
            raise CorruptModel(f"{self.label}: tensor {name!r} has type {raw.ggml_type}, which deskpod cannot read") from None
        return np.asarray(values, dtype=np.float32).reshape(raw.shape)

    def _tensor(self, name: str) -> _TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise CorruptModel(f"{self.label}: tensor {name!r} is missing") from None


# Plain (unblocked) tensor types and their numpy dtypes; every other type is read as bytes.
PLAIN_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64}

# GGUF metadata value types → struct format (GGUFValueType: 0..12; 8 = string, 9 = array).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_ARRAY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class _TensorInfo:
    ggml_type: str
    shape: tuple[int, ...]  # PyTorch order
    offset: int  # absolute, in the file
    n_bytes: int

    def extent(self, expert: int | None = None) -> tuple[int, int, tuple[int, ...]]:
        """(offset, n_bytes, shape) of the tensor, or of one expert's slice of a stacked [experts, rows, cols] one."""
        if expert is None:
            return self.offset, self.n_bytes, self.shape
        n_bytes = self.n_bytes // self.shape[0]
        return self.offset + expert * n_bytes, n_bytes, self.shape[1:]


class _Header:
    """Walks the GGUF v2/v3 header: magic, version, counts, key/value metadata, tensor infos."""

    def __init__(self, data: np.ndarray):
        self.buf = memoryview(data)
        self.pos = 4

    def _unpack(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._unpack("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError(f"a string of {n:,} bytes runs past the end of the file")
        text = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8")
        self.pos += n
        return text

    def _value(self, kind: int):
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, count = self._unpack("<I"), self._unpack("<Q")
            if item == _STRING:
                return [self._string() for _ in range(count)]
            if item not in _ARRAY_DTYPES:
                return [self._value(item) for _ in range(count)]
            dtype = np.dtype(_ARRAY_DTYPES[item])
            values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return values.tolist()
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata value type {kind}")
        return self._unpack(_SCALARS[kind])

    def parse(self) -> tuple[dict[str, Any], dict[str, _TensorInfo]]:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        version = self._unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (deskpod reads versions 2 and 3)")
        n_tensors, n_kv = self._unpack("<Q"), self._unpack("<Q")
        metadata = {}
        for _ in range(n_kv):
            key = self._string()
            metadata[key] = self._value(self._unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._unpack("<Q") for _ in range(self._unpack("<I"))]
            kind, offset = GGMLQuantizationType(self._unpack("<I")), self._unpack("<Q")
            block, block_bytes = GGML_QUANT_SIZES[kind]
            if dims and dims[0] % block:
                raise ValueError(f"tensor {name!r}: rows of {dims[0]} are not whole {kind.name} blocks of {block}")
            n = int(np.prod(dims, dtype=np.int64))
            # GGUF lists dims innermost first; PyTorch wants outermost first.
            infos.append((name, kind.name, tuple(reversed(dims)), offset, n // block * block_bytes))
        alignment = int(metadata.get("general.alignment", 32))
        data_start = -(-self.pos // alignment) * alignment
        tensors = {name: _TensorInfo(kind, shape, data_start + offset, nbytes) for name, kind, shape, offset, nbytes in infos}
        return metadata, tensors


def _check_magic(path: Path, label: str) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CorruptModel(f"{label}: cannot open ({e.strerror})") from None
    if head != GGUF_MAGIC:
        raise CorruptModel(f"{label}: not a GGUF file (starts with {head!r}, expected {GGUF_MAGIC!r})")


# --- as a weight source ---------------------------------------------------------------------------

# Architectures whose q/k rows llama.cpp's converter interleaves (RoPE on adjacent pairs: its "norm" rope
# type): read back in Hugging Face's rotate-half order. The others (qwen2, qwen3, gemma*, phi3: "neox")
# are stored as Hugging Face has them.
INTERLEAVED_QK = frozenset({"llama"})
# what an architecture's GGUF calls a layer's tensor -> the canonical name: gpt-oss's `post_attention_norm` is
# the norm before its MLP (Gemma's, of the same name, is one after attention)
GGUF_RENAMES = {"gpt-oss": {"post_attention_norm": "ffn_norm"}}
QK_TENSORS = ("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")


def rotate_half_order(rows: int, heads: int) -> np.ndarray:
    """Row order taking a head's rows from interleaved pairs (x0, x1), (x2, x3), ... to rotate-half order
    (the inverse of llama.cpp's `permute`): output row j of each half gathers pair j's element."""
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(-1)


@dataclass(frozen=True, eq=False, kw_only=True)
class GGUFFloatTensor(StoredTensor):
    file: GGUFFile
    stored_name: str = ""  # the file's name for it, when it differs (an expert's slice of a stacked tensor)
    expert: int | None = None

    @property
    def file_name(self) -> str:
        return self.name if self.expert is None else f"{self.stored_name}[{self.expert}]"

    def float(self):
        import torch

        values = np.ascontiguousarray(self._ordered(self.file.dequantize(self.stored_name or self.name, self.expert)))
        return torch.from_numpy(values if values.flags.writeable else values.copy())  # never a view of the file


@dataclass(frozen=True, eq=False, kw_only=True)
class GGUFBlockTensor(BlockTensor):
    file: GGUFFile
    stored_name: str = ""
    expert: int | None = None

    file_name = GGUFFloatTensor.file_name

    def float(self):
        return GGUFFloatTensor.float(self)  # type: ignore[arg-type]  # the same reading

    def blocks(self) -> np.ndarray:
        return self._ordered(self.file.mapped(self.stored_name or self.name, self.expert))


@dataclass(frozen=True, eq=False, kw_only=True)
class GGUFMxfp4Tensor(SchemeTensor):
    """A tensor in ggml's MXFP4 blocks (gpt-oss's experts): each block of 32 is its E8M0 scale, then 16 bytes
    holding element j in byte j's low nibble and j + 16 in its high one. Read as deskpod's mxfp4 (codes of a row
    in pairs, the lower nibble first; the same E8M0 scales): the same values, never re-quantized."""

    file: GGUFFile
    stored_name: str = ""
    expert: int | None = None

    file_name = GGUFFloatTensor.file_name

    def parts(self):
        import torch

        data = self.file.raw(self.stored_name or self.name, self.expert).data
        blocks = data.reshape(data.shape[0], -1, 17)
        scales, qs = blocks[..., 0], blocks[..., 1:]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # the block's 32 elements in order
        packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).reshape(data.shape[0], -1)
        return {"weight": torch.from_numpy(np.ascontiguousarray(self._ordered(packed))),
                "weight_scale": torch.from_numpy(np.ascontiguousarray(self._ordered(scales)))}

    def float(self):
        raise TypeError(f"{self.name} is mxfp4: build a QuantizedTensor from its parts()")


class GGUFWeights(WeightSource):
    """A GGUF file as a weight source: llama.cpp's tensor names are the canonical ones already."""

    format = "gguf"

    def __init__(self, path: str | Path, label: str | None = None):
        self.gguf = GGUFFile(path, label)
        label = self.gguf.label
        try:
            spec = spec_from_gguf(self.gguf.metadata, self.gguf.has_tensor("output.weight"), label)
        except SpecError as e:
            raise spec_error(label, "the GGUF metadata", e) from None
        tensors = {info.name: _stored(self.gguf, info) for info in self.gguf.tensors()}
        _split_experts(tensors)
        for stored, canonical in GGUF_RENAMES.get(self.gguf.architecture, {}).items():
            for name in [n for n in tensors if n.startswith("blk.") and n.split(".")[2] == stored]:
                tensor = tensors.pop(name)
                renamed = f"blk.{name.split('.')[1]}.{canonical}.{name.split('.', 3)[3]}"
                tensors[renamed] = replace(tensor, name=renamed, stored_name=tensor.stored_name or name)
        if spec.architecture in INTERLEAVED_QK:
            _to_rotate_half(tensors, spec, label)
        super().__init__(label, spec, tensors)


def _stored(file: GGUFFile, info: TensorInfo) -> StoredTensor:
    if info.ggml_type == "MXFP4":
        return GGUFMxfp4Tensor(info.name, info.shape, "mxfp4", info.n_bytes, file=file)
    kind = GGUFFloatTensor if info.ggml_type in FLOAT_DTYPES else GGUFBlockTensor
    return kind(info.name, info.shape, info.ggml_type, info.n_bytes, file=file)


def _split_experts(tensors: dict[str, StoredTensor]) -> None:
    """llama.cpp stacks a layer's experts into one [experts, rows, cols] tensor (`blk.i.ffn_gate_exps`; their
    biases, gpt-oss's, [experts, rows]); the canonical names are per expert (`blk.i.ffn_gate_exps.e`), each read
    alone from its slice of the file."""
    for name, tensor in list(tensors.items()):
        base, _, kind = name.rpartition(".")
        if base.endswith("_exps") and len(tensor.shape) == (2 if kind == "bias" else 3):
            del tensors[name]
            count = tensor.shape[0]
            for e in range(count):
                tensors[f"{base}.{e}.{kind}"] = replace(tensor, name=f"{base}.{e}.{kind}", shape=tensor.shape[1:],
                                                        nbytes=tensor.nbytes // count, stored_name=name, expert=e)


def _to_rotate_half(tensors: dict[str, StoredTensor], spec: ModelSpec, label: str) -> None:
    heads = {"attn_q": spec.num_heads, "attn_k": spec.num_kv_heads}
    for name, tensor in tensors.items():
        if name.startswith("blk.") and name.split(".", 2)[2] in QK_TENSORS:
            count = heads[name.split(".")[2]]
            if tensor.rows % (2 * count):
                raise CorruptModel(f"{label}: {tensor.name} has {tensor.rows} rows, not a whole number of {count} heads' pairs")
            tensors[name] = tensor.permute_rows(rotate_half_order(tensor.rows, count))
