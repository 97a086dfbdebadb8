"""One tensor between the wire and numpy: raw bytes (the binary tensor data extension, gRPC's
raw_input_contents) and JSON `data` lists, both ways. Every size a client states is checked against the
bytes it sent: a lying header is an InvalidRequest naming the tensor, never a crash or a misread.

BYTES travel as elements each prefixed by its 4-byte little-endian length; in numpy they are an object
array of `bytes`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from deskpod.backends.datatypes import numpy_dtype
from deskpod.errors import InvalidRequest

BYTES = "BYTES"
_LENGTH = struct.Struct("<I")


def dtype_of(name: str, datatype: Any) -> np.dtype:
    """The numpy dtype of v2 datatype `datatype`; InvalidRequest naming the tensor for an unknown one."""
    try:
        return numpy_dtype(str(datatype))
    except (KeyError, ValueError, TypeError) as e:
        raise InvalidRequest(f"input `{name}`: unknown datatype {datatype!r}") from e


def check_shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, Sequence) or isinstance(shape, (str, bytes)):
        raise InvalidRequest(f"input `{name}`: `shape` must be a list of dimensions, got {shape!r}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidRequest(f"input `{name}`: every dimension of `shape` must be an integer >= 0, got {list(shape)}")
    return tuple(shape)


# --- raw bytes ---------------------------------------------------------------------------------


def decode_bytes_elements(name: str, raw: bytes | memoryview, count: int) -> np.ndarray:
    """`count` length-prefixed elements filling `raw` exactly -> an object array of bytes."""
    view, offset, items = memoryview(raw), 0, []
    for i in range(count):
        if offset + 4 > len(view):
            raise InvalidRequest(f"input `{name}`: BYTES data ends before element {i} of {count} (its length prefix)")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidRequest(
                f"input `{name}`: BYTES element {i} says {length} bytes but only {len(view) - offset} remain"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != len(view):
        raise InvalidRequest(f"input `{name}`: {len(view) - offset} bytes left after the {count} BYTES elements the shape holds")
    out = np.empty(count, dtype=object)
    out[:] = items
    return out


def encode_bytes_elements(array: np.ndarray) -> bytes:
    parts = []
    for item in array.ravel():
        data = item if isinstance(item, bytes) else str(item).encode()
        parts += (_LENGTH.pack(len(data)), data)
    return b"".join(parts)


def from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes | memoryview) -> np.ndarray:
    """A tensor from its raw little-endian bytes (row-major), checked to be exactly the shape's size."""
    dtype, dims = dtype_of(name, datatype), check_shape(name, shape)
    count = math.prod(dims)
    if datatype == BYTES:
        return decode_bytes_elements(name, raw, count).reshape(dims)
    want = count * dtype.itemsize
    if len(raw) != want:
        raise InvalidRequest(
            f"input `{name}`: {len(raw)} bytes of data, but shape {list(dims)} of {datatype} needs {want}"
        )
    # a writable copy: backends may hand it to torch, which warns on read-only memory (hosts are little-endian)
    return np.frombuffer(bytearray(raw), dtype=dtype).reshape(dims)


def to_raw(array: np.ndarray) -> bytes:
    if array.dtype.kind in "OSU":
        return encode_bytes_elements(array)
    return np.ascontiguousarray(array).tobytes()


# --- JSON --------------------------------------------------------------------------------------


def from_json(name: str, datatype: str, shape: Sequence[int], data: Any) -> np.ndarray:
    """A tensor from a JSON `data` list (flat or nested, row-major); BYTES elements are strings."""
    dtype, dims = dtype_of(name, datatype), check_shape(name, shape)
    if not isinstance(data, list):
        raise InvalidRequest(f"input `{name}`: `data` must be a list, got {type(data).__name__}")
    try:
        if datatype == BYTES:
            flat = np.asarray(data, dtype=object).ravel()
            array = np.empty(flat.size, dtype=object)
            array[:] = [_utf8(name, item) for item in flat]
        else:
            array = _numeric(data, dtype)
    except (ValueError, TypeError, OverflowError) as e:
        raise InvalidRequest(f"input `{name}`: `data` is not a list of {datatype} values: {e}") from e
    if array.size != math.prod(dims):
        raise InvalidRequest(
            f"input `{name}`: `data` holds {array.size} values, but shape {list(dims)} needs {math.prod(dims)}"
        )
    return array.reshape(dims)


def _numeric(data: list, dtype: np.dtype) -> np.ndarray:
    """Refuses values the datatype cannot hold as they are (1.5 for an INT32, "x" for an FP32) rather than
    rounding them the way numpy would."""
    loose = np.asarray(data)
    if loose.dtype == object or loose.dtype.kind in "USV":
        raise ValueError("found non-numeric or ragged values")
    if dtype.kind in "iub" and loose.dtype.kind == "f":
        raise ValueError("found fractional numbers")
    if dtype.kind == "b" and not np.isin(loose, (0, 1)).all():
        raise ValueError("booleans must be true/false")
    return np.asarray(data, dtype=dtype).ravel()


def _utf8(name: str, item: Any) -> bytes:
    if isinstance(item, str):
        return item.encode()
    raise TypeError(f"BYTES values in JSON are strings, got {type(item).__name__}")


def to_json(array: np.ndarray) -> list:
    """The flat row-major JSON `data` of a tensor; BYTES as UTF-8 strings (binary outputs must be asked
    for as binary data)."""
    if array.dtype.kind in "OSU":
        try:
            return [item.decode() if isinstance(item, bytes) else str(item) for item in array.ravel()]
        except UnicodeDecodeError as e:
            raise InvalidRequest(
                "an output holds bytes that are not UTF-8 text: ask for it with \"binary_data\": true"
            ) from e
    if array.dtype.kind == "V" or array.dtype.itemsize == 2 and array.dtype.kind == "f":
        array = array.astype(np.float32)  # FP16 / BF16: JSON numbers via float32
    return array.ravel().tolist()
