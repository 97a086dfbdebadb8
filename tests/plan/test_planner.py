import pytest

from deskpod.plan.devices import HARDWARE
from deskpod.plan.planner import make_plan
from deskpod.plan.shape import InvalidPlanInput
from deskpod.plan.source import resolve


def plan(model, hardware, **kwargs):
    return make_plan(resolve(model), HARDWARE[hardware], **kwargs)


# -- the seed claims ------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["nvfp4", "fp4", "mxfp4"])
def test_a_200b_model_at_fp4_fits_one_digits_with_a_useful_context(precision):
    result = plan("200b", "digits", precision=precision)
    assert result.fits and result.nodes_needed == 1
    assert result.max_context >= 8192
    assert result.memory.total <= 124e9


def test_llama_405b_at_fp4_needs_two_linked_digits():
    one = plan("llama-3.1-405b", "digits", precision="nvfp4")
    assert not one.fits and one.nodes_needed == 2 and one.max_context == 0
    two = plan("llama-3.1-405b", "digits-x2", precision="nvfp4")
    assert two.fits and two.nodes_needed == 2
    assert two.max_context >= 8192
    assert two.memory.weights == pytest.approx(one.weights.total / 2, abs=1)  # per box


# -- the rest -------------------------------------------------------------------------------------


def test_a_plan_that_does_not_fit_still_estimates_speed_on_the_boxes_it_needs():
    result = plan("llama-3.1-405b", "digits", precision="nvfp4")
    assert "speeds are for 2 linked boxes" in result.notes[0]
    assert result.speed.link_s_per_token > 0 and result.speed.decode_tokens_per_s > 0


def test_the_json_carries_the_promised_keys():
    data = plan("gpt-oss-120b", "digits", precision="mxfp4", context=32_768, batch=4).to_json()
    for key in ("fits", "nodes_needed", "memory", "prefill_tokens_per_s", "decode_tokens_per_s", "max_context",
                "max_batch", "time_to_first_token_s"):
        assert key in data
    memory = data["memory"]
    parts = ("weights", "kv_cache", "activations", "runtime_overhead")
    assert memory["total_bytes"] == sum(memory[p] for p in parts)
    assert memory["kv_cache"] == memory["kv_cache_per_token"] * 32_768 * 4
    assert data["params_active"] < data["params_total"] / 20


def test_defaults_context_and_precision():
    result = plan("qwen3-14b", "digits")
    assert result.precision == "bf16" and result.memory.context == 8192
    assert plan("smollm2", "digits").memory.context == 8192  # its maximum
    assert plan("llama-3.1-8b", "digits", context=300).speed.prompt_tokens == 300


def test_a_gguf_plans_with_its_own_bytes_unless_asked_otherwise(tiny_gguf):
    own = make_plan(resolve(str(tiny_gguf)), HARDWARE["digits"], context=64)
    assert own.weights.total == 1664 and "file's own tensors" in own.notes[0]
    other = make_plan(resolve(str(tiny_gguf)), HARDWARE["digits"], context=64, precision="bf16")
    assert other.precision == "bf16" and other.weights.total != 1664


def test_contexts_above_the_model_maximum_need_force():
    with pytest.raises(InvalidPlanInput, match="exceeds the model's maximum of 40,960 tokens; pass --force"):
        plan("qwen3-14b", "digits", context=100_000)
    forced = plan("qwen3-14b", "digits", context=100_000, force=True)
    assert forced.memory.context == 100_000 and forced.max_context > 40_960


@pytest.mark.parametrize("context, batch, match", [(0, 1, "context"), (-1, 1, "context"), (10, 0, "batch")])
def test_nonsense_contexts_and_batches_are_refused(context, batch, match):
    with pytest.raises(InvalidPlanInput, match=f"{match} must be a positive number"):
        plan("llama-3.1-8b", "digits", context=context, batch=batch)
