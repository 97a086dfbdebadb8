from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from deskpod.backends import datatypes

NAMES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
         "FP16", "FP32", "FP64", "BF16", "BYTES"]


def test_table_covers_every_v2_datatype():
    assert sorted(d.name for d in datatypes.DATATYPES) == sorted(NAMES)
    # every config enum but TYPE_INVALID has its row
    assert sorted(datatypes.BY_ENUM) == sorted(v for k, v in mc.DataType.items() if k != "TYPE_INVALID")


@pytest.mark.parametrize("name", NAMES)
def test_round_trips_and_agrees_with_tritonclient(name):
    enum = datatypes.config_enum(name)
    assert datatypes.v2_name(enum) == name
    dtype = datatypes.numpy_dtype(name)
    assert datatypes.v2_name_of(np.zeros(2, dtype)) == name
    if name != "BYTES":  # tritonclient maps BYTES to np.object_ too, but through its own helper
        assert np.dtype(triton_to_np_dtype(name)) == dtype
        assert np_to_triton_dtype(dtype) == name


def test_specific_mappings():
    assert datatypes.v2_name(mc.TYPE_STRING) == "BYTES"
    assert datatypes.numpy_dtype("BF16") == np.dtype(ml_dtypes.bfloat16)
    assert datatypes.v2_name_of(np.array(["a"])) == "BYTES"
    assert datatypes.v2_name_of(np.array([b"a"])) == "BYTES"
    with pytest.raises(ValueError, match="unknown datatype 'FP8'"):
        datatypes.numpy_dtype("FP8")
    with pytest.raises(ValueError, match="complex64 has no tensor datatype"):
        datatypes.v2_name_of(np.zeros(1, np.complex64))


def test_bytes_arrays_become_object_arrays_of_bytes():
    out = datatypes.as_bytes_array(np.array([["hé", "x"]]))
    assert out.dtype == np.object_ and out.shape == (1, 2) and out.tolist() == [["hé".encode(), b"x"]]
    keep = np.array([b"a\x00"], dtype=np.object_)
    assert datatypes.as_bytes_array(keep) is keep  # trailing NULs survive: no "S" round trip
