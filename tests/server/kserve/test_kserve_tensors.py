"""One tensor between the wire and numpy: raw bytes and JSON data, both ways, and every lie refused."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from deskpod.errors import InvalidRequest
from deskpod.server.kserve import tensors

NUMERIC = [
    ("BOOL", np.array([[True, False, True]])),
    ("UINT8", np.array([0, 7, 255], np.uint8)),
    ("INT8", np.array([-128, 0, 127], np.int8)),
    ("INT16", np.array([-3, 4], np.int16)),
    ("UINT16", np.array([3, 65535], np.uint16)),
    ("INT32", np.arange(6, dtype=np.int32).reshape(2, 3)),
    ("UINT32", np.array([1, 2**32 - 1], np.uint32)),
    ("INT64", np.array([-(2**62), 2**62], np.int64)),
    ("UINT64", np.array([2**63], np.uint64)),
    ("FP16", np.array([0.5, -2.0], np.float16)),
    ("FP32", np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)),
    ("FP64", np.array([1e-300, 3.5])),
    ("BF16", np.array([1.5, -0.25], ml_dtypes.bfloat16)),
]


@pytest.mark.parametrize(("datatype", "array"), NUMERIC)
def test_raw_round_trip(datatype: str, array: np.ndarray) -> None:
    back = tensors.from_raw("x", datatype, array.shape, tensors.to_raw(array))
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    back[...] = array  # writable: backends may hand it to torch


@pytest.mark.parametrize(("datatype", "array"), NUMERIC)
def test_json_round_trip(datatype: str, array: np.ndarray) -> None:
    back = tensors.from_json("x", datatype, list(array.shape), tensors.to_json(array))
    assert back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)


def test_json_accepts_nested_lists() -> None:
    back = tensors.from_json("x", "INT32", [2, 2], [[1, 2], [3, 4]])
    np.testing.assert_array_equal(back, [[1, 2], [3, 4]])


def test_bytes_elements_match_tritonclient_both_ways() -> None:
    array = np.array([b"", b"hello", "h\u00e9".encode(), bytes(range(256))], dtype=object).reshape(2, 2)
    raw = tensors.to_raw(array)
    assert raw == serialize_byte_tensor(array).item()
    np.testing.assert_array_equal(deserialize_bytes_tensor(raw).reshape(2, 2), array)
    back = tensors.from_raw("s", "BYTES", [2, 2], raw)
    assert back.dtype == object and back.tolist() == array.tolist()


def test_bytes_json_are_strings() -> None:
    back = tensors.from_json("s", "BYTES", [2], ["a", "\u00e9"])
    assert back.tolist() == [b"a", "\u00e9".encode()]
    assert tensors.to_json(back) == ["a", "\u00e9"]


@pytest.mark.parametrize(
    ("datatype", "shape", "raw", "message"),
    [
        ("FP32", [2, 3], b"\0" * 20, "20 bytes of data, but shape [2, 3] of FP32 needs 24"),
        ("FP32", [2], b"\0" * 12, "needs 8"),
        ("BYTES", [2], b"\x05\0\0\0abc", "element 0 says 5 bytes but only 3 remain"),
        ("BYTES", [2], b"\x01\0\0\0a", "ends before element 1 of 2"),
        ("BYTES", [1], b"\x01\0\0\0ab", "1 bytes left after the 1 BYTES elements"),
        ("FP33", [1], b"\0" * 4, "unknown datatype 'FP33'"),
        ("FP32", [-1], b"", "integer >= 0"),
        ("FP32", "4", b"", "must be a list of dimensions"),
    ],
)
def test_raw_lies_are_refused(datatype: str, shape, raw: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match="input `t`") as e:
        tensors.from_raw("t", datatype, shape, raw)
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("datatype", "shape", "data", "message"),
    [
        ("FP32", [3], [1.0, 2.0], "holds 2 values, but shape [3] needs 3"),
        ("FP32", [2], ["a", "b"], "not a list of FP32 values"),
        ("INT32", [2], [1.5, 2], "fractional"),
        ("UINT8", [1], [300], "not a list of UINT8 values"),
        ("BOOL", [1], [2], "true/false"),
        ("FP32", [2], [[1.0], [2.0, 3.0]], "not a list of FP32 values"),
        ("BYTES", [1], [3], "strings"),
        ("FP32", [1], 1.0, "`data` must be a list"),
    ],
)
def test_json_mistakes_are_refused(datatype: str, shape, data, message: str) -> None:
    with pytest.raises(InvalidRequest, match="input `t`") as e:
        tensors.from_json("t", datatype, shape, data)
    assert message in str(e.value)


def test_non_utf8_output_asks_for_binary() -> None:
    with pytest.raises(InvalidRequest, match="binary_data"):
        tensors.to_json(np.array([b"\xff"], dtype=object))
