"""`deskpod quantize`: a new store model from a stored one, that `deskpod run` runs; clear refusals; and
nothing left in the store (or in the temp folder) when it fails or is interrupted.

(Named test_quantize_cli.py: pytest's default import mode wants test module names unique across folders,
and tests/test_cli.py exists.)"""

from __future__ import annotations

import json
import tempfile

import pytest
from support.tiny_llama import write_tiny_llama

import deskpod.quant.convert as convert_module
from deskpod.cli import main
from deskpod.plan.source import resolve
from deskpod.quant.cli import default_name
from deskpod.server.registry import _load_llm, loader_for
from deskpod.store import Store


@pytest.fixture
def store(tmp_path, monkeypatch) -> Store:
    """A private store holding the tiny Llama as `tiny`, and a private temp folder to check for leftovers."""
    monkeypatch.setenv("DESKPOD_HOME", str(tmp_path / "home"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    store = Store(tmp_path / "home")
    store.pull(str(write_tiny_llama(tmp_path / "tiny.gguf")), name="tiny", progress=False)
    return store


def refs(store: Store) -> set[str]:
    return {m.ref for m in store.list()}


def test_quantize_then_run(store, capsys):
    assert main(["quantize", "tiny", "--to", "nvfp4"]) == 0
    out = capsys.readouterr().out
    assert "tiny-nvfp4:latest" in out and "bits/weight" in out
    manifest = store.get("tiny-nvfp4")
    assert (manifest.format, manifest.architecture, manifest.quantization) == ("safetensors", "llama", "NVFP4")
    config = json.loads((store.model_dir(manifest) / "config.json").read_text())
    assert config["quantization_config"]["source"] == "tiny:latest"
    assert manifest.source == "deskpod quantize tiny:latest --to nvfp4"  # not the scratch folder it was made in
    assert loader_for(manifest) is _load_llm  # `deskpod serve tiny-nvfp4` runs it with the LLM engine
    assert resolve("tiny-nvfp4").precision == "nvfp4"  # `deskpod plan` sizes it at its scheme's bits

    assert main(["run", "tiny-nvfp4", "the", "--raw", "--temperature", "0", "--max-tokens", "5", "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert len(done["token_ids"]) + (done["finish_reason"] == "stop") >= 1 and done["finish_reason"] in ("stop", "length")


def test_a_safetensors_store_model_is_quantized_too(store, tmp_path):
    float_folder = tmp_path / "tiny-f32"
    convert_module.convert(write_tiny_llama(tmp_path / "t.gguf"), float_folder, "int8", keep=("*",))  # a float HF folder
    store.pull(str(float_folder), name="tiny-hf", progress=False)
    assert main(["quantize", "tiny-hf", "--to", "mxfp4"]) == 0
    quant = json.loads((store.model_dir("tiny-hf-mxfp4") / "config.json").read_text())["quantization_config"]
    assert (quant["scheme"], quant["source"], quant["source_quantization"]) == ("mxfp4", "tiny-hf:latest", "mixed")
    assert main(["run", "tiny-hf-mxfp4", "the", "--raw", "--temperature", "0", "--max-tokens", "2"]) == 0


def test_name_option_and_default_names(store):
    assert main(["quantize", "tiny:latest", "--to", "int8", "--name", "tiny-small:v1"]) == 0
    assert "tiny-small:v1" in refs(store)
    assert main(["quantize", "tiny", "--to", "int8", "--name", "tiny:latest"]) == 1  # would replace its own source
    assert store.get("tiny").format == "gguf"
    assert default_name("smollm2", "nvfp4") == "smollm2-nvfp4"
    assert default_name("smollm2:v2", "fp8") == "smollm2-v2-fp8"


def test_unknown_scheme(store, capsys):
    assert main(["quantize", "tiny", "--to", "fp3"]) == 1
    err = capsys.readouterr().err
    assert "unknown quantization scheme 'fp3'" in err and "nvfp4" in err
    assert refs(store) == {"tiny:latest"}


def test_an_onnx_model_is_refused(store, tiny_onnx, capsys):
    store.pull(str(tiny_onnx), name="vision", progress=False)
    assert main(["quantize", "vision", "--to", "fp8"]) == 1
    assert "vision:latest is in onnx format; `deskpod quantize` converts GGUF and safetensors models" in capsys.readouterr().err


def test_unknown_model(store, capsys):
    assert main(["quantize", "nosuchmodel", "--to", "fp8"]) == 1
    assert "'nosuchmodel:latest' is not in the store" in capsys.readouterr().err


def test_quantizing_a_quantized_model_is_refused(store, capsys):
    assert main(["quantize", "tiny", "--to", "nvfp4"]) == 0
    capsys.readouterr()
    assert main(["quantize", "tiny-nvfp4", "--to", "fp8"]) == 1
    err = capsys.readouterr().err
    assert "tiny-nvfp4:latest is already quantized (nvfp4)" in err and "Quantize the original model (tiny:latest)" in err
    assert refs(store) == {"tiny-nvfp4:latest", "tiny:latest"}


def test_interrupted_quantize_leaves_nothing(store, monkeypatch, tmp_path):
    calls = []
    real = convert_module._convert_group

    def interrupted(source, group):
        calls.append(group)
        if len(calls) == 5:  # some tensors are done, the folder is half written
            raise KeyboardInterrupt
        return real(source, group)

    monkeypatch.setattr(convert_module, "_convert_group", interrupted)
    assert main(["quantize", "tiny", "--to", "mxfp4"]) == 130
    assert refs(store) == {"tiny:latest"}
    assert list((tmp_path / "tmp").iterdir()) == []  # the half-written folder is gone too


def test_nan_fails_cleanly_naming_the_tensor(store, monkeypatch, tmp_path, capsys):
    from deskpod.formats.gguf import GGUFBlockTensor

    real = GGUFBlockTensor.float

    def with_nan(self):
        w = real(self)
        if self.name == "blk.1.attn_v.weight":
            w[0, 0] = float("nan")
        return w

    monkeypatch.setattr(GGUFBlockTensor, "float", with_nan)
    assert main(["quantize", "tiny", "--to", "int4"]) == 1
    assert "blk.1.attn_v.weight contains NaN" in capsys.readouterr().err
    assert refs(store) == {"tiny:latest"} and list((tmp_path / "tmp").iterdir()) == []
