import json

import gguf
import numpy as np
import pytest

from deskpod.errors import ModelNotFound, UnsupportedModel
from deskpod.plan.shape import InvalidPlanInput
from deskpod.plan.source import resolve


def write_moe_gguf(path):
    """A 2-layer MoE GGUF (8 experts, 2 routed) with an untied LM head, Q8_0 experts."""
    writer = gguf.GGUFWriter(str(path), "qwen3moe")
    for add, value in ((writer.add_block_count, 2), (writer.add_embedding_length, 64),
                       (writer.add_feed_forward_length, 256), (writer.add_expert_feed_forward_length, 32),
                       (writer.add_head_count, 4), (writer.add_head_count_kv, 2), (writer.add_key_length, 16),
                       (writer.add_context_length, 4096), (writer.add_expert_count, 8),
                       (writer.add_expert_used_count, 2), (writer.add_vocab_size, 100),
                       (writer.add_file_type, gguf.LlamaFileType.MOSTLY_Q8_0)):
        add(value)
    writer.add_tensor("token_embd.weight", np.zeros((100, 64), np.float16))  # 12,800 bytes
    writer.add_tensor("output.weight", np.zeros((100, 64), np.float16))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), np.float32))  # 16,384 bytes
    experts = gguf.quantize(np.zeros((8, 32, 64), np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.ffn_up_exps.weight", experts, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_gives_its_shape_and_its_exact_tensor_bytes(tiny_gguf):
    source = resolve(str(tiny_gguf))
    shape = source.shape
    assert (shape.num_layers, shape.hidden_size, shape.num_heads, shape.num_kv_heads) == (2, 16, 4, 2)
    assert (shape.head_dim, shape.intermediate_size, shape.vocab_size, shape.max_context) == (4, 32, 10, 256)
    assert shape.tied_embeddings  # no output.weight
    assert (source.weights.embedding, source.weights.dense, source.weights.total) == (640, 1024, 1664)
    assert source.origin.startswith("GGUF ")


def test_a_moe_gguf(tmp_path):
    source = resolve(str(write_moe_gguf(tmp_path / "moe.gguf")))
    shape, weights = source.shape, source.weights
    assert (shape.num_experts, shape.experts_per_token, shape.intermediate_size, shape.head_dim) == (8, 2, 32, 16)
    assert not shape.tied_embeddings
    assert (weights.embedding, weights.head, weights.dense) == (12_800, 12_800, 16_384)
    assert weights.experts == 8 * 32 * 64 * 34 // 32  # Q8_0: 34 bytes per 32 weights
    assert (source.precision, source.file_type) == ("q8_0", "Q8_0")


def test_a_gguf_that_is_not_a_decoder_llm_is_refused(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "enc.gguf"), "bert")
    writer.add_embedding_length(64)
    writer.add_tensor("token_embd.weight", np.zeros((10, 64), np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModel, match="missing bert.block_count, bert.attention.head_count, bert.feed_forward"):
        resolve(str(tmp_path / "enc.gguf"))


def test_a_config_json_or_its_folder(tmp_path):
    config = {"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
              "intermediate_size": 14336, "vocab_size": 128256, "max_position_embeddings": 131072,
              "torch_dtype": "bfloat16", "model_type": "llama"}
    folder = tmp_path / "Llama-3.1-8B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    for spec in (folder, folder / "config.json"):
        source = resolve(str(spec))
        assert source.shape.name == "Llama-3.1-8B" and source.precision == "bf16"
        assert source.shape.total_params / 1e9 == pytest.approx(8.03, rel=1e-3)
    fp8 = {**config, "quantization_config": {"quant_method": "fp8"}}
    (folder / "config.json").write_text(json.dumps(fp8))
    assert resolve(str(folder)).precision == "fp8"


def test_a_config_json_missing_fields_names_them(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    with pytest.raises(InvalidPlanInput, match="missing num_hidden_layers, vocab_size, intermediate_size"):
        resolve(str(path))


def test_a_store_model(store, make_tiny_gguf, tmp_path):
    store.pull(str(make_tiny_gguf(tmp_path / "tiny-plan.gguf")), name="tiny-plan", progress=False)
    source = resolve("tiny-plan")
    assert source.origin == "store model tiny-plan:latest"
    assert source.shape.name == "tiny-plan" and source.weights.total == 1664


def test_builtins_and_sizes():
    assert resolve("gpt-oss-120b").origin.startswith("built-in gpt-oss-120b (https://huggingface.co/")
    assert resolve("200B").shape.total_params == pytest.approx(200e9, rel=0.01)
    assert resolve("1.5t").shape.total_params == pytest.approx(1.5e12, rel=0.01)
    assert resolve("300m").shape.num_layers == 10


@pytest.mark.parametrize("spec", ["-3b", "0b", "0.000001b", "9999t"])
def test_nonsense_sizes_are_refused(spec):
    with pytest.raises(InvalidPlanInput, match="not a size the planner can shape"):
        resolve(spec)


def test_unknown_names_list_close_matches():
    with pytest.raises(ModelNotFound, match="Did you mean: gpt-oss-20b, gpt-oss-120b"):
        resolve("gpt-oss-2b")
    with pytest.raises(ModelNotFound, match="unknown model 'abc'.*size like 200b") as raised:
        resolve("abc")
    assert "Did you mean" not in str(raised.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(InvalidPlanInput, match="does not exist"):
        resolve(str(tmp_path / "nope.gguf"))


def test_a_damaged_gguf_is_refused_naming_the_file(tiny_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:200])  # ends inside the metadata
    with pytest.raises(InvalidPlanInput, match=r"cannot read GGUF .*cut\.gguf: truncated or damaged"):
        resolve(str(cut))
