"""GGUFFile: broken files name themselves; every tensor type dequantizes as the gguf package says."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from deskpod.errors import CorruptModel
from deskpod.formats.gguf import GGUFFile

ROWS, COLS = 6, 512  # COLS fits two 256-element K-quant super-blocks


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, Q | None]]) -> Path:
    """A GGUF with the given tensors; (array, None) stores a float array as is, (bytes, type) raw blocks."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    for name, (data, raw_type) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_k_blocks(qtype: Q, seed: int = 0) -> np.ndarray:
    """Valid K-quant bytes: every bit pattern of the codes and 6-bit scales is legal; the fp16 super-block
    scales (d and dmin for Q4_K at bytes 0..3, d for Q6_K at its last 2 bytes) are set small and finite."""
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(ROWS, COLS // 256, block_bytes), dtype=np.uint8)
    scale_fields = {Q.Q4_K: [slice(0, 2), slice(2, 4)], Q.Q6_K: [slice(block_bytes - 2, block_bytes)]}[qtype]
    for field in scale_fields:
        blocks[..., field] = rng.uniform(1e-3, 1e-2, (ROWS, COLS // 256, 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(ROWS, -1)


@pytest.fixture(scope="module")
def weights() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((ROWS, COLS)).astype(np.float32)


# --- broken files -------------------------------------------------------------------------------


def test_truncated_file_names_itself(tmp_path, make_tiny_gguf):
    whole = make_tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    for cut in (len(whole) - 100, 200, 10):  # in the tensor data, in the metadata, in the header
        path = tmp_path / f"cut-{cut}.gguf"
        path.write_bytes(whole[:cut])
        with pytest.raises(CorruptModel) as e:
            GGUFFile(path)
        assert str(path) in str(e.value)


def test_garbage_after_the_magic_names_the_file(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"GGUF" + np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CorruptModel) as e:
        GGUFFile(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 a zip file", b"\x80\x04\x95 a pickle"])
def test_wrong_magic_says_not_gguf(tmp_path, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(CorruptModel, match="not a GGUF file") as e:
        GGUFFile(path)
    assert str(path) in str(e.value)


def test_missing_file_names_itself(tmp_path):
    with pytest.raises(CorruptModel, match="cannot open") as e:
        GGUFFile(tmp_path / "absent.gguf")
    assert "absent.gguf" in str(e.value)


def test_missing_tensor_names_tensor_and_file(tmp_path, weights):
    path = write_gguf(tmp_path / "m.gguf", {"a.weight": (weights, None)})
    f = GGUFFile(path)
    for read in (f.raw, f.dequantize):
        with pytest.raises(CorruptModel, match="'b.weight' is missing") as e:
            read("b.weight")
        assert str(path) in str(e.value)


# --- reading ------------------------------------------------------------------------------------


def test_metadata_and_raw_tensor(tmp_path, weights):
    path = write_gguf(tmp_path / "m.gguf", {"w": (quantize(weights, Q.Q4_1), Q.Q4_1)})
    f = GGUFFile(path)
    assert f.architecture == "llama" and f.arch_value("block_count") == 1 and f.arch_value("absent", 7) == 7
    assert f.tensor_names() == ["w"] and f.has_tensor("w") and not f.has_tensor("v")
    raw = f.raw("w")
    assert (raw.ggml_type, raw.shape) == ("Q4_1", (ROWS, COLS))  # PyTorch order: [out, in]
    np.testing.assert_array_equal(np.asarray(raw.data).reshape(ROWS, -1), quantize(weights, Q.Q4_1))


# type -> the largest error of one round trip, relative to the largest |weight| (what the format keeps)
FLOAT_ROUND_TRIPS = {Q.F32: 0, Q.F16: 1e-3, Q.BF16: 8e-3, Q.Q8_0: 1e-2, Q.Q4_1: 0.1, Q.Q4_0: 0.15}


@pytest.mark.parametrize("qtype", list(FLOAT_ROUND_TRIPS), ids=lambda t: t.name)
def test_dequantize_round_trips_within_the_type_error(tmp_path, weights, qtype):
    if qtype == Q.F32:
        stored = (weights, None)
    elif qtype == Q.F16:
        stored = (weights.astype(np.float16), None)
    else:
        stored = (quantize(weights, qtype), qtype)
    values = GGUFFile(write_gguf(tmp_path / "m.gguf", {"w": stored})).dequantize("w")
    assert values.dtype == np.float32 and values.shape == (ROWS, COLS)
    error = np.abs(values - weights).max() / np.abs(weights).max()
    assert error <= FLOAT_ROUND_TRIPS[qtype], f"{qtype.name}: relative error {error:.3g}"
    if qtype != Q.F32:  # and the error is the format's own, not noise from the reader
        np.testing.assert_array_equal(values, dequantize(stored[0], qtype).reshape(ROWS, COLS).astype(np.float32))


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=lambda t: t.name)
def test_k_quants_dequantize_like_gguf(tmp_path, qtype):
    blocks = random_k_blocks(qtype)
    f = GGUFFile(write_gguf(tmp_path / "m.gguf", {"w": (blocks, qtype)}))
    assert f.raw("w").shape == (ROWS, COLS)
    values = f.dequantize("w")
    assert values.shape == (ROWS, COLS) and np.isfinite(values).all()
    np.testing.assert_array_equal(values, dequantize(blocks, qtype).reshape(ROWS, COLS))


def test_three_dimensional_tensor_keeps_pytorch_order(tmp_path):
    stacked = np.arange(2 * 3 * 32, dtype=np.float32).reshape(2, 3, 32)  # e.g. experts x out x in
    f = GGUFFile(write_gguf(tmp_path / "m.gguf", {"experts": (stacked, None)}))
    assert f.raw("experts").shape == (2, 3, 32)
    np.testing.assert_array_equal(f.dequantize("experts"), stacked)


def test_tensors_describe_every_tensor_as_the_gguf_reader_does(tmp_path, weights):
    path = write_gguf(tmp_path / "m.gguf", {
        "q": (quantize(weights, Q.Q4_1), Q.Q4_1),
        "k": (random_k_blocks(Q.Q6_K), Q.Q6_K),
        "experts": (np.zeros((2, 3, 32), np.float16), None),
    })
    infos = list(GGUFFile(path).tensors())
    assert [(t.name, t.ggml_type, t.shape) for t in infos] == [
        ("q", "Q4_1", (ROWS, COLS)), ("k", "Q6_K", (ROWS, COLS)), ("experts", "F16", (2, 3, 32))]
    expected = [(t.name, t.tensor_type.name, int(t.n_bytes), int(t.n_elements)) for t in gguf.GGUFReader(path).tensors]
    assert [(t.name, t.ggml_type, t.n_bytes, t.n_elements) for t in infos] == expected
