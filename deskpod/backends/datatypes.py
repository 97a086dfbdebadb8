"""One table for tensor datatypes: the KServe v2 name, Triton's config enum and the numpy dtype.

BYTES tensors are numpy object arrays of `bytes` (Triton's convention); numpy "S"/"U" arrays are accepted
and turned into that. BF16 is ml_dtypes.bfloat16, the type tritonclient itself uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import numpy.typing as npt
from tritonclient.grpc import model_config_pb2 as mc


@dataclass(frozen=True)
class Datatype:
    name: str  # KServe v2 name, e.g. "FP32"
    enum: int  # model_config_pb2.DataType, e.g. TYPE_FP32
    dtype: np.dtype
    ort: str  # onnxruntime's type string, e.g. "tensor(float)"


def _dt(name: str, enum: int, dtype: npt.DTypeLike, ort: str) -> Datatype:
    return Datatype(name, enum, np.dtype(dtype), ort)


DATATYPES: tuple[Datatype, ...] = (
    _dt("BOOL", mc.TYPE_BOOL, np.bool_, "tensor(bool)"),
    _dt("UINT8", mc.TYPE_UINT8, np.uint8, "tensor(uint8)"),
    _dt("UINT16", mc.TYPE_UINT16, np.uint16, "tensor(uint16)"),
    _dt("UINT32", mc.TYPE_UINT32, np.uint32, "tensor(uint32)"),
    _dt("UINT64", mc.TYPE_UINT64, np.uint64, "tensor(uint64)"),
    _dt("INT8", mc.TYPE_INT8, np.int8, "tensor(int8)"),
    _dt("INT16", mc.TYPE_INT16, np.int16, "tensor(int16)"),
    _dt("INT32", mc.TYPE_INT32, np.int32, "tensor(int32)"),
    _dt("INT64", mc.TYPE_INT64, np.int64, "tensor(int64)"),
    _dt("FP16", mc.TYPE_FP16, np.float16, "tensor(float16)"),
    _dt("FP32", mc.TYPE_FP32, np.float32, "tensor(float)"),
    _dt("FP64", mc.TYPE_FP64, np.float64, "tensor(double)"),
    _dt("BF16", mc.TYPE_BF16, ml_dtypes.bfloat16, "tensor(bfloat16)"),
    _dt("BYTES", mc.TYPE_STRING, np.object_, "tensor(string)"),
)

BY_NAME = {d.name: d for d in DATATYPES}
BY_ENUM = {d.enum: d for d in DATATYPES}
BY_ORT = {d.ort: d for d in DATATYPES}
BY_DTYPE = {d.dtype: d for d in DATATYPES}


def v2_name(config_enum: int) -> str:
    """TYPE_FP32 -> "FP32"; TYPE_STRING -> "BYTES"."""
    try:
        return BY_ENUM[config_enum].name
    except KeyError:
        raise ValueError(f"data type {mc.DataType.Name(config_enum)} has no tensor datatype") from None


def config_enum(v2: str) -> int:
    """"FP32" -> TYPE_FP32."""
    return BY_NAME[v2].enum


def numpy_dtype(v2: str) -> np.dtype:
    """"FP32" -> float32; "BYTES" -> object."""
    try:
        return BY_NAME[v2].dtype
    except KeyError:
        raise ValueError(f"unknown datatype {v2!r}; expected one of {', '.join(BY_NAME)}") from None


def v2_name_of(array: np.ndarray) -> str:
    """The v2 datatype of a numpy array; str/bytes arrays ("U"/"S"/object) are BYTES."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    try:
        return BY_DTYPE[array.dtype].name
    except KeyError:
        raise ValueError(f"numpy dtype {array.dtype} has no tensor datatype") from None


def as_bytes_array(array: np.ndarray) -> np.ndarray:
    """A BYTES tensor in its canonical form: an object array whose items are `bytes` (str is UTF-8 encoded)."""
    if array.dtype == np.object_ and all(isinstance(x, bytes) for x in array.flat):
        return array
    out = np.empty(array.shape, dtype=np.object_)
    for index, item in np.ndenumerate(array):
        out[index] = item.encode() if isinstance(item, str) else bytes(item)
    return out
