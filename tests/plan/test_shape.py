import pytest

from deskpod.formats.spec import ModelSpec, SpecError
from deskpod.plan.builtins import BUILTINS, close_builtins, get_builtin
from deskpod.plan.shape import InvalidPlanInput, ModelShape


@pytest.mark.parametrize(
    "name, total_b, active_b",
    [
        ("llama-3.1-8b", 8.03, None),
        ("llama-3.1-70b", 70.55, None),
        ("llama-3.1-405b", 405.85, None),
        ("qwen3-14b", 14.77, None),
        ("qwen3-235b-a22b", 235.09, 21.57),  # published: 235 B total, 22 B active
        ("gpt-oss-20b", 20.91, 3.61),  # published: 21 B / 3.6 B
        ("gpt-oss-120b", 116.79, 5.13),  # published: 117 B / 5.1 B
        ("smollm2", 0.1345, None),  # the GGUF holds 134,515,008 parameters
    ],
)
def test_builtin_parameter_counts_match_the_published_ones(name, total_b, active_b):
    shape = get_builtin(name)
    assert shape.total_params / 1e9 == pytest.approx(total_b, rel=2e-3)
    if active_b is not None:
        assert shape.active_params / 1e9 == pytest.approx(active_b, rel=2e-3)


def test_every_builtin_cites_its_config():
    for shape in BUILTINS.values():
        assert shape.source.startswith("https://huggingface.co/") and shape.source.endswith("config.json")


def test_moe_counts_all_experts_for_memory_and_routed_ones_for_compute():
    shape = get_builtin("gpt-oss-120b")
    experts = shape.num_layers * shape.num_experts * shape.expert_params
    assert shape.total_params > experts > 20 * shape.active_params
    dense = get_builtin("llama-3.1-8b")
    assert dense.active_params == dense.total_params - dense.embedding_params


def test_aliases_and_close_matches():
    assert get_builtin("SmolLM2-135M-Instruct").name == "smollm2"
    assert close_builtins("llama-3.1-8")[:3] == ["llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b"]


def test_from_hf_config_reads_a_moe_config():
    config = {
        "model_type": "gpt_oss", "num_hidden_layers": 24, "hidden_size": 2880, "num_attention_heads": 64,
        "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 2880, "vocab_size": 201088,
        "max_position_embeddings": 131072, "num_local_experts": 32, "num_experts_per_tok": 4,
        "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"] * 12,
        "tie_word_embeddings": False,
    }
    shape = ModelShape.from_hf_config(config, "gpt-oss-20b")
    assert shape == ModelShape(**{**get_builtin("gpt-oss-20b").__dict__, "architecture": "gpt_oss", "source": ""})


def test_from_hf_config_prefers_the_moe_width_and_nested_text_config():
    text = {"num_hidden_layers": 48, "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4,
            "head_dim": 128, "intermediate_size": 6144, "moe_intermediate_size": 768, "vocab_size": 151936,
            "num_experts": 128, "num_experts_per_tok": 8, "model_type": "qwen3_moe"}
    shape = ModelShape.from_hf_config({"text_config": text}, "q")
    assert (shape.intermediate_size, shape.num_experts, shape.tied_embeddings) == (768, 128, False)
    assert shape.total_params / 1e9 == pytest.approx(get_builtin("qwen3-30b-a3b").total_params / 1e9)


def test_from_hf_config_names_the_missing_fields():
    with pytest.raises(InvalidPlanInput, match="missing num_hidden_layers, vocab_size"):
        ModelShape.from_hf_config({"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128}, "x")


def test_from_spec():
    spec = ModelSpec("gemma3", 262144, 640, 2048, 18, 4, 1, 256, 32768, sliding_window=512,
                     layer_types=(("sliding",) * 5 + ("full",)) * 3, tied_embeddings=True)
    shape = ModelShape.from_spec(spec, "gemma3-270m")
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.max_context) == (18, 1, 256, 32768)
    assert (shape.sliding_window, shape.sliding_layers, shape.tied_embeddings) == (512, 15, True)
    with pytest.raises(SpecError, match="num_layers = 0: these must be positive"):  # a spec is checked when made
        ModelSpec("bert", 10, 8, 8, 0, 2, 2, 4, 64)


@pytest.mark.parametrize("params, hidden, layers", [(8e9, 4096, 32), (405e9, 16000, 124), (200e9, 12544, 99),
                                                    (3e8, 1152, 10)])
def test_dense_of_size_follows_llama_proportions(params, hidden, layers):
    shape = ModelShape.dense_of_size(params)
    assert (shape.hidden_size, shape.num_layers, shape.head_dim, shape.num_kv_heads) == (hidden, layers, 128, 8)
    assert shape.total_params == pytest.approx(params, rel=0.02)


def test_a_shape_with_zero_sizes_is_refused():
    with pytest.raises(InvalidPlanInput, match="num_layers"):
        ModelShape("bad", "llama", 0, 64, 4, 4, 16, 128, 100, 1024)
    with pytest.raises(InvalidPlanInput, match="experts_per_token"):
        ModelShape("bad", "moe", 2, 64, 4, 4, 16, 128, 100, 1024, num_experts=4, experts_per_token=5)
