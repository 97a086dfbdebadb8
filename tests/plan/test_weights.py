import pytest

from deskpod.plan.builtins import get_builtin
from deskpod.plan.precision import SCHEMES, get_scheme, kv_dtype_bytes
from deskpod.plan.shape import InvalidPlanInput
from deskpod.plan.weights import expert_fraction, weight_bytes


@pytest.mark.parametrize(
    "name, bits", [("nvfp4", 4 + 8 / 16), ("mxfp4", 4 + 8 / 32), ("int4", 4 + 16 / 128), ("q4_0", 18 * 8 / 32),
                   ("q8_0", 34 * 8 / 32), ("fp8", 8), ("bf16", 16)]
)
def test_bits_per_weight_count_the_block_scales(name, bits):
    assert SCHEMES[name].body_bits == bits


def test_every_scheme_keeps_embedding_and_head_at_least_as_wide_as_the_body():
    for scheme in SCHEMES.values():
        assert scheme.embed_bits >= scheme.body_bits and scheme.head_bits >= scheme.body_bits


def test_aliases_and_unknown_precisions():
    assert get_scheme("FP4").name == "nvfp4" and get_scheme("bfloat16").name == "bf16"
    with pytest.raises(InvalidPlanInput, match="unknown precision 'fp3'.*nvfp4"):
        get_scheme("fp3")
    assert kv_dtype_bytes("fp8") == 1
    with pytest.raises(InvalidPlanInput):
        kv_dtype_bytes("int2")


def test_weight_bytes_by_part():
    shape = get_builtin("llama-3.1-8b")
    weights = weight_bytes(shape, SCHEMES["nvfp4"])
    embed = shape.vocab_size * shape.hidden_size
    assert weights.embedding == weights.head == embed  # 8 bits each
    assert weights.dense == pytest.approx((shape.body_params + shape.hidden_size) * 4.5 / 8, abs=1)
    assert weights.experts == 0
    assert weight_bytes(shape, SCHEMES["bf16"]).total == pytest.approx(2 * shape.total_params, abs=4)


def test_tied_embedding_is_stored_once_at_the_wider_width():
    shape = get_builtin("smollm2")
    weights = weight_bytes(shape, SCHEMES["q4_0"])
    assert weights.head == 0 and weights.tied
    assert weights.embedding == pytest.approx(shape.embedding_params * 6.5625 / 8, abs=1)


def test_a_decode_step_reads_the_routed_experts_only():
    shape = get_builtin("gpt-oss-120b")
    weights = weight_bytes(shape, SCHEMES["mxfp4"])
    one = weights.read_per_step(shape, 1)
    assert one == weights.dense + weights.head + int(weights.experts * 4 / 128)
    assert one < weights.total / 10
    # a batch touches more experts, but never more than all of them
    assert one < weights.read_per_step(shape, 8) < weights.read_per_step(shape, 10_000) <= weights.total
    assert expert_fraction(shape, 1) == pytest.approx(4 / 128)
    assert expert_fraction(get_builtin("llama-3.1-8b"), 8) == 0
