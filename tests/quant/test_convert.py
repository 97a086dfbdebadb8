"""deskpod.quant.convert: GGUF / safetensors Llama -> quantized HF folder, and what the engine makes of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from support.loading import load, logits_of
from support.tiny_llama import write_tiny_llama

from deskpod.engine.tokenizer import Tokenizer
from deskpod.errors import CorruptModel
from deskpod.formats.gguf import GGUFFile, rotate_half_order
from deskpod.formats.meta import read_meta
from deskpod.quant.convert import TABLE_SCHEME, QuantizeError, convert

SCHEMES = ("fp8", "nvfp4", "mxfp4", "int4", "int8")
# Relative error of the tiny model's logits against its float32 reference, per scheme: about what each
# scheme's rounding gives on random weights (measured: fp8 0.04, nvfp4 0.15, mxfp4 0.19, int4 0.09, int8 0.01).
MAX_LOGIT_ERROR = {"fp8": 0.08, "nvfp4": 0.25, "mxfp4": 0.3, "int4": 0.15, "int8": 0.02}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny random Llama with an untied Q4_0 head (so lm_head is written too)."""
    return write_tiny_llama(tmp_path_factory.mktemp("src") / "tiny.gguf", tied=False)


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("quantized")
    folders = {scheme: out / scheme for scheme in SCHEMES}
    for scheme, folder in folders.items():
        convert(tiny, folder, scheme, source_name="tiny:latest")
    return folders


@pytest.fixture(scope="module")
def float_export(tiny, tmp_path_factory) -> Path:
    """Everything kept: the GGUF as a float HF folder (exact values, HF names and RoPE order)."""
    folder = tmp_path_factory.mktemp("float") / "tiny-float"
    convert(tiny, folder, "int4", keep=("*",))
    return folder


def logits(lm, n: int = 40, kv_cache_dtype: str = "auto") -> torch.Tensor:
    return logits_of(lm, [i % lm.spec.vocab_size for i in range(n)], kv_cache_dtype=kv_cache_dtype)


@pytest.fixture(scope="module")
def reference(tiny) -> torch.Tensor:
    return logits(load(tiny, "float32"))


def test_rotate_half_order_inverts_llama_cpp_permute():
    heads, w = 3, torch.randn(3 * 8, 5)
    # llama.cpp's converter: reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)
    permuted = w.reshape(heads, 2, 4, 5).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(permuted[torch.from_numpy(rotate_half_order(len(w), heads))], w)


def test_float_export_runs_like_the_gguf(float_export, reference):
    # HF names, rotate-half RoPE on un-permuted q/k rows: the same function as GGUF's interleaved order
    torch.testing.assert_close(logits(load(float_export, "float32")), reference, rtol=1e-5, atol=1e-5)
    assert "quantization_config" not in json.loads((float_export / "config.json").read_text())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_model_stays_close_to_the_source(converted, reference, scheme):
    compact, expanded = load(converted[scheme], "compact"), load(converted[scheme], "float32")
    got = logits(compact)  # as the engine runs it: a float16 KV cache
    error = float((got - reference).norm() / reference.norm())
    assert 0 < error < MAX_LOGIT_ERROR[scheme]
    # the kernels compute what the dequantized weights do, but for the int8 rounding of activations that the
    # int4 and int8 kernels (the int8 embedding and output head of every scheme among them) share with GGUF's
    exact, float_cache = logits(expanded), logits(compact, kv_cache_dtype="float32")
    assert float((float_cache - exact).norm() / exact.norm()) < 0.02


def test_files_follow_the_contract(tiny, converted):
    folder = converted["nvfp4"]
    config = json.loads((folder / "config.json").read_text())
    quant = config["quantization_config"]
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["tie_word_embeddings"]) == (2, 2, False)
    assert quant["quant_method"] == "deskpod" and quant["scheme"] == "nvfp4" and quant["source"] == "tiny:latest"
    assert quant["source_quantization"] == read_meta(tiny).quantization  # 4-bit GGUF blocks: still converted
    assert quant["overrides"] == {"model.embed_tokens": TABLE_SCHEME, "lm_head": TABLE_SCHEME}
    assert set(quant["ignore"]) == {"model.norm", *(f"model.layers.{i}.{n}" for i in (0, 1)
                                                    for n in ("input_layernorm", "post_attention_layernorm"))}
    tensors = load_file(folder / "model.safetensors")
    p = "model.layers.1.self_attn."
    assert tensors[p + "q_proj.weight"].dtype == torch.uint8 and tensors[p + "q_proj.weight"].shape == (64, 32)
    assert tensors[p + "q_proj.weight_scale"].dtype == torch.float8_e4m3fn
    # q, k and v were quantized as one matrix: one per-tensor scale, so the engine can fuse them exactly
    assert tensors[p + "q_proj.weight_scale_2"] == tensors[p + "k_proj.weight_scale_2"] == tensors[p + "v_proj.weight_scale_2"]
    assert tensors["model.embed_tokens.weight"].dtype == torch.int8 and tensors["lm_head.weight"].dtype == torch.int8
    assert tensors["model.norm.weight"].dtype == torch.float32
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (folder / name).is_file()
    meta = read_meta(folder)
    assert meta.quantization == "NVFP4"
    assert meta.parameters == quant["parameters"] == sum(t.n_elements for t in GGUFFile(tiny).tensors())


def test_tokenizer_survives_the_round_trip(tiny, converted):
    original, saved = Tokenizer.from_gguf(GGUFFile(tiny)), Tokenizer.from_folder(converted["int8"])
    text = "<|im_start|>user\nthe herder in there<|im_end|>"
    assert saved.encode(text) == original.encode(text) and saved.decode(saved.encode(text)) == original.decode(original.encode(text))
    assert saved.eog_ids == original.eog_ids and saved.special == original.special
    assert saved.chat_template == original.chat_template


def test_a_float_safetensors_source_gives_what_the_gguf_gives(float_export, converted, tmp_path):
    convert(float_export, tmp_path / "from-folder", "int4")
    assert _tensors_equal(load_file(tmp_path / "from-folder" / "model.safetensors"), load_file(converted["int4"] / "model.safetensors"))


def test_keep_leaves_modules_at_source_precision(tiny, tmp_path):
    convert(tiny, tmp_path / "kept", "mxfp4", keep=("lm_head", "model.layers.1.mlp.*"))
    with safe_open(tmp_path / "kept" / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("lm_head.weight").dtype == torch.float32  # a Q4_0 source: its exact float32 expansion
        assert f.get_tensor("model.layers.1.mlp.down_proj.weight").dtype == torch.bfloat16  # BF16 in the GGUF
    assert "model.layers.1.mlp.gate_proj.weight_scale" not in names and "model.layers.0.mlp.gate_proj.weight_scale" in names
    quant = json.loads((tmp_path / "kept" / "config.json").read_text())["quantization_config"]
    assert {"lm_head", "model.layers.1.mlp.up_proj"} <= set(quant["ignore"]) and quant["keep"] == ["lm_head", "model.layers.1.mlp.*"]
    assert load(tmp_path / "kept").spec.num_layers == 2


def test_unknown_scheme_lists_the_known_ones(tiny, tmp_path):
    with pytest.raises(QuantizeError, match="unknown quantization scheme 'fp3'.*nvfp4.*mxfp4"):
        convert(tiny, tmp_path / "x", "fp3")
    assert not (tmp_path / "x").exists()


def test_an_already_quantized_model_is_refused(converted, tmp_path):
    with pytest.raises(QuantizeError, match=r"already quantized \(nvfp4\).*Quantize the original model \(tiny:latest\)"):
        convert(converted["nvfp4"], tmp_path / "twice", "fp8")


def test_nan_in_a_tensor_names_it(float_export, tmp_path):
    source = tmp_path / "broken"
    source.mkdir()
    for f in float_export.iterdir():
        (source / f.name).write_bytes(f.read_bytes())
    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(source / "model.safetensors"))
    with pytest.raises(CorruptModel, match=r"model\.layers\.1\.mlp\.up_proj\.weight contains NaN"):
        convert(source, tmp_path / "out", "nvfp4")


def _tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))
                                        if a[k].dim() else torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fmt", ["gguf", "safetensors"])
@pytest.mark.parametrize("name", ["qwen2", "qwen3", "gemma3", "gemma2", "mistral", "llama-bias", "llama-rope-yarn"])
def test_every_architecture_quantizes(tmp_path, name, fmt):
    """deskpod quantize reads every architecture through its weight source and writes a folder the engine
    runs as the same model: close to transformers' float32 logits at int8 (gemma's 1 + w norms, Llama's
    un-permuted rows and the configs' windows and RoPE all survive the round trip)."""
    from support.architectures import CASES, build_hf, hf_logits, prompts, write_gguf

    case = CASES[name]
    folder = build_hf(case, tmp_path / name)
    source = write_gguf(case, folder, tmp_path / f"{name}.gguf") if fmt == "gguf" else folder
    convert(source, tmp_path / "int8", "int8")
    ids = prompts(1, 40)[0]
    [want] = hf_logits(folder, [ids])
    got = logits_of(load(tmp_path / "int8", "float32"), ids)
    assert float((got - want).norm() / want.norm()) < 0.05  # measured 1.8-2.8%: int8 rounding of every weight
