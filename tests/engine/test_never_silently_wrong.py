"""Inputs deskpod once accepted and ran wrong, each now either right or refused by name (never ignored):
transformers 5's rope_parameters, bias tensors, RoPE scalings, a Mistral GGUF's window, an MoE GGUF's gating, and
any option, tensor or feature an architecture does not implement."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from support.architectures import CASES, build_hf, hf_logits, prompts, write_gguf, write_mixtral_gguf
from support.loading import load, logits_of

from deskpod.errors import CorruptModel, UnsupportedModel

IDS = prompts(1, 40)[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("silent")
    return {name: build_hf(CASES[name], root / name) for name in ("llama", "llama-rope-llama3", "gemma3", "mistral", "llama-bias")}


def edited(folder: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / f"{folder.name}-edited"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    edit(config)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def to_transformers_4(config: dict) -> None:
    """transformers 4's layout: rope_theta and rope_scaling beside the other keys (Gemma 3: plus
    rope_local_base_freq and the sliding_window_pattern)."""
    rope = config.pop("rope_parameters")
    if "full_attention" in rope:
        config["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        config["sliding_window_pattern"] = 6
        del config["layer_types"]
        rope = rope["full_attention"]
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope if rope.get("rope_type") != "default" else None


@pytest.mark.parametrize("name", ["llama-rope-llama3", "gemma3"])
def test_transformers_4_and_5_configs_give_the_same_model(folders, tmp_path, name):
    [want] = hf_logits(folders[name], [IDS])  # transformers 5 wrote rope_parameters
    v4 = edited(folders[name], tmp_path, to_transformers_4)
    for folder in (folders[name], v4):
        torch.testing.assert_close(logits_of(load(folder, "float32"), IDS), want, rtol=0, atol=1e-4)
    # and the scaling matters: the same weights without it are far off
    plain = edited(folders[name], tmp_path / "plain", lambda c: (to_transformers_4(c), c.update(rope_scaling=None)))
    assert (logits_of(load(plain, "float32"), IDS) - want).abs().max() > 0.01


def test_a_mistral_gguf_honours_its_window(folders, tmp_path):
    [want] = hf_logits(folders["mistral"], [IDS])
    path = write_gguf(CASES["mistral"], folders["mistral"], tmp_path / "mistral.gguf")
    torch.testing.assert_close(logits_of(load(path, "float32"), IDS), want, rtol=0, atol=1e-4)
    assert load(path).spec.sliding_window == 12 and len(IDS) > 12


def test_bias_tensors_and_the_config_must_agree(folders, tmp_path):
    # the biases are used (test_architectures compares them with transformers); a file without the biases its
    # config promises is refused, and so is one holding biases its config says it has not
    without = edited(folders["llama-bias"], tmp_path / "a", lambda c: None)
    tensors = load_file(without / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith("q_proj.bias")}, str(without / "model.safetensors"))
    with pytest.raises(CorruptModel, match=r"blk.0.attn_q.bias' is missing"):
        load(without)
    denied = edited(folders["llama-bias"], tmp_path / "b", lambda c: c.update(attention_bias=False))
    with pytest.raises(UnsupportedModel, match=r"not used.*model.layers.0.self_attn.k_proj.bias"):  # as the file names it
        load(denied)


@pytest.mark.parametrize(("change", "named"), [
    ({"attention_multiplier": 0.5}, "the option 'attention_multiplier'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 2.0}}, "RoPE scaling 'longrope'"),
    ({"attn_logit_softcapping": 50.0}, r"attention logit softcapping \(50\)"),
    ({"hidden_act": "relu2"}, "MLP activation 'relu2'"),
    ({"partial_rotary_factor": 0.5}, "the option 'partial_rotary_factor'"),
    ({"num_local_experts": 8, "num_experts_per_tok": 2}, "the option 'num_local_experts'"),  # Llama has no experts
])
def test_an_option_the_architecture_does_not_implement_is_refused_by_name(folders, tmp_path, change, named):
    folder = edited(folders["llama"], tmp_path, lambda c: c.update(change))
    with pytest.raises(UnsupportedModel, match=named) as e:
        load(folder, name="my-llama")
    assert str(e.value).startswith("my-llama: ")


def test_a_tensor_no_layer_takes_is_refused_by_name(folders, tmp_path):
    folder = edited(folders["llama"], tmp_path, lambda c: None)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.self_attn.sinks"] = torch.zeros(4)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(UnsupportedModel, match=r"1 tensor .* is not used .*model.layers.1.self_attn.sinks"):
        load(folder)


def test_a_mixture_of_experts_gguf_with_another_gating_is_refused_by_name(tmp_path):
    load(write_mixtral_gguf(tmp_path / "mixtral.gguf"), name="mixtral")  # softmax routing: runs
    with pytest.raises(UnsupportedModel, match=r"^sigmoid-moe: .*the option 'llama.expert_gating_func'"):
        load(write_mixtral_gguf(tmp_path / "sigmoid.gguf", gating=2), name="sigmoid-moe")


def test_an_unknown_gguf_key_is_refused_by_name(tmp_path, folders):
    path = write_gguf(CASES["llama"], folders["llama"], tmp_path / "llama.gguf")
    edited_path = tmp_path / "scaled.gguf"
    reader = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(edited_path), "llama")
    for field in reader.fields.values():
        if field.name.startswith(("GGUF.", "general.architecture")):
            continue
        w.add_key_value(field.name, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
    w.add_float32("llama.residual_scale", 1.4)
    for t in reader.tensors:
        w.add_tensor(t.name, np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist()))))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModel, match="the option 'llama.residual_scale'"):
        load(edited_path)
