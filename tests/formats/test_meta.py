"""read_meta on real and tiny GGUF files, safetensors folders and ONNX files, and on damaged ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from deskpod.errors import CorruptModel, ModelNotFound, UnsupportedModel
from deskpod.formats.meta import ModelMeta, read_meta


def test_tiny_gguf(tiny_gguf: Path) -> None:
    meta = read_meta(tiny_gguf)
    assert meta == ModelMeta(
        format="gguf",
        architecture="llama",
        parameters=10 * 16 + 32 * 16,
        quantization="F16",  # no general.file_type: the tensor type holding most parameters
        context_length=256,
        spec=meta.spec,
    )
    spec = meta.spec  # the same reading the engine and the planner make
    assert (spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads) == (2, 16, 4, 2)
    assert (spec.head_dim, spec.vocab_size, spec.intermediate_size) == (4, 10, 32)  # head_dim: hidden / heads


def test_gguf_file_type_names_the_quantization(tmp_path: Path, make_tiny_gguf) -> None:
    path = make_tiny_gguf(tmp_path / "m.gguf", file_type=gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert read_meta(path).quantization == "Q4_K_M"


def test_without_file_type_the_type_holding_most_parameters_names_the_quantization(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    writer.add_tensor("big.weight", np.zeros((8, 64), np.float32))  # 512 F32
    for i in range(3):  # 3 x 256 F16: fewer per tensor, more in all
        writer.add_tensor(f"small.{i}.weight", np.zeros((4, 64), np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    meta = read_meta(tmp_path / "m.gguf")
    assert (meta.parameters, meta.quantization) == (512 + 3 * 256, "F16")


def test_gguf_blob_without_suffix_is_recognised_by_magic(tiny_gguf: Path, tmp_path: Path) -> None:
    blob = tmp_path / "0123abcd"
    shutil.copy(tiny_gguf, blob)
    assert read_meta(blob).architecture == "llama"


def test_smollm2(smollm2_gguf: Path) -> None:
    meta = read_meta(smollm2_gguf)
    assert (meta.format, meta.architecture, meta.quantization) == ("gguf", "llama", "Q4_1")
    assert meta.parameters == 134_515_008
    spec = meta.spec
    assert (meta.context_length, spec.num_layers, spec.hidden_size) == (8192, 30, 576)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (9, 3, 64)
    assert (spec.vocab_size, spec.intermediate_size) == (49152, 1536)


def test_every_truncation_of_a_gguf_is_corrupt_model(tiny_gguf: Path, tmp_path: Path) -> None:
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    for size in [*range(0, len(data), 37), len(data) - 1]:
        cut.write_bytes(data[:size])
        with pytest.raises(CorruptModel, match=r"cut\.gguf"):
            read_meta(cut)


def test_truncated_real_gguf_names_the_file(smollm2_gguf: Path, tmp_path: Path) -> None:
    cut = tmp_path / "smollm2-cut.gguf"
    with smollm2_gguf.open("rb") as src:
        cut.write_bytes(src.read(64 << 10))  # ends inside the tokenizer's token list
    with pytest.raises(CorruptModel, match=r"smollm2-cut\.gguf.*(truncated|damaged)"):
        read_meta(cut)


def test_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(CorruptModel, match=r"fake\.gguf: not a GGUF file"):
        read_meta(path)


def test_safetensors_folder(tiny_hf_dir: Path) -> None:
    meta = read_meta(tiny_hf_dir)
    assert (meta.format, meta.architecture, meta.parameters, meta.quantization) == ("safetensors", "bert", 104, "F32")
    spec = meta.spec
    assert (meta.context_length, spec.num_layers, spec.hidden_size, spec.num_heads) == (64, 2, 8, 2)
    assert (spec.num_kv_heads, spec.head_dim, spec.vocab_size, spec.intermediate_size) == (2, 4, 12, 16)


def test_minilm(minilm_dir: Path) -> None:
    meta = read_meta(minilm_dir)
    assert (meta.format, meta.architecture, meta.quantization) == ("safetensors", "bert", "F32")
    assert meta.parameters == 22_713_728
    assert (meta.spec.num_layers, meta.spec.hidden_size, meta.spec.vocab_size) == (6, 384, 30522)


def test_nested_text_config_and_quantization_config(tiny_hf_dir: Path) -> None:
    config = json.loads((tiny_hf_dir / "config.json").read_text())
    nested = {"model_type": "gemma3", "text_config": config, "quantization_config": {"quant_method": "fp8"}}
    (tiny_hf_dir / "config.json").write_text(json.dumps(nested))
    meta = read_meta(tiny_hf_dir)
    assert (meta.architecture, meta.quantization, meta.spec.num_layers) == ("gemma3", "FP8", 2)


def test_truncated_safetensors(tiny_hf_dir: Path) -> None:
    weights = tiny_hf_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CorruptModel, match=r"model\.safetensors: truncated"):
        read_meta(tiny_hf_dir)


def test_folder_without_config_or_weights(tiny_hf_dir: Path) -> None:
    (tiny_hf_dir / "model.safetensors").unlink()
    with pytest.raises(UnsupportedModel, match=r"no \*\.safetensors"):
        read_meta(tiny_hf_dir)
    (tiny_hf_dir / "config.json").unlink()
    with pytest.raises(UnsupportedModel):
        read_meta(tiny_hf_dir)


def test_onnx(tiny_onnx: Path) -> None:
    assert read_meta(tiny_onnx) == ModelMeta("onnx", "onnx", 0, "unknown", 0)


def test_unknown_and_missing_files(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(UnsupportedModel, match=r"notes\.txt"):
        read_meta(notes)
    with pytest.raises(ModelNotFound):
        read_meta(tmp_path / "absent.gguf")
