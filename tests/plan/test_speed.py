from dataclasses import replace

import pytest

from deskpod.plan import speed
from deskpod.plan.builtins import get_builtin
from deskpod.plan.devices import HARDWARE
from deskpod.plan.precision import SCHEMES
from deskpod.plan.shape import ModelShape
from deskpod.plan.weights import weight_bytes

DIGITS = HARDWARE["digits"]
LLAMA_8B = get_builtin("llama-3.1-8b")


def test_decode_is_bytes_over_bandwidth():
    scheme = SCHEMES["fp8"]
    weights = weight_bytes(LLAMA_8B, scheme)
    step = speed.decode_step_s(LLAMA_8B, weights, DIGITS, scheme, depth=1000)
    nbytes = weights.total - weights.embedding + 1000 * 131_072
    assert step == pytest.approx(nbytes / (273e9 * DIGITS.decode_efficiency))


def test_prefill_is_flops_over_peak():
    scheme = SCHEMES["nvfp4"]
    weights = weight_bytes(LLAMA_8B, scheme)
    seconds = speed.prefill_s(LLAMA_8B, weights, DIGITS, scheme, 2048)
    head = LLAMA_8B.vocab_size * LLAMA_8B.hidden_size  # only the last token's logits are computed
    flops = 2 * ((LLAMA_8B.active_params - head) * 2048 + head) + speed.attention_flops(LLAMA_8B, 2048, 1024)
    assert seconds == pytest.approx(flops / (500e12 * DIGITS.prefill_efficiency))


def test_moe_decodes_at_its_active_size_not_its_total():
    moe = get_builtin("gpt-oss-120b")
    dense = ModelShape.dense_of_size(moe.total_params)
    scheme = SCHEMES["mxfp4"]
    fast = speed.estimate(moe, weight_bytes(moe, scheme), DIGITS, scheme, prompt=512)
    slow = speed.estimate(dense, weight_bytes(dense, scheme), DIGITS, scheme, prompt=512)
    assert fast.decode_tokens_per_s > 10 * slow.decode_tokens_per_s
    assert fast.prefill_tokens_per_s > 4 * slow.prefill_tokens_per_s


def test_local_attention_layers_read_only_their_window():
    shape = get_builtin("gpt-oss-20b")
    full = replace(shape, sliding_layers=0)
    assert speed.kv_read_bytes(shape, 100) == speed.kv_read_bytes(full, 100)
    assert speed.kv_read_bytes(shape, 10_000) < 0.6 * speed.kv_read_bytes(full, 10_000)


def test_a_pipeline_of_two_boxes_adds_a_hop_to_each_token():
    shape, scheme = get_builtin("llama-3.1-405b"), SCHEMES["nvfp4"]
    weights = weight_bytes(shape, scheme)
    two = replace(DIGITS, nodes=2)
    one_box = speed.decode_step_s(shape, weights, two, scheme, 100)
    est = speed.estimate(shape, weights, two, scheme, prompt=100, batch=4, nodes=2)
    hop = two.link_latency + shape.hidden_size * 2 / two.link_bandwidth
    assert est.link_s_per_token == pytest.approx(hop)
    assert 1 / est.decode_tokens_per_s == pytest.approx(one_box + hop)
    assert est.decode_throughput > 1.5 * est.decode_tokens_per_s  # micro-batches keep both boxes busy


def test_tensor_parallel_divides_a_step_between_gpus():
    shape, scheme = get_builtin("llama-3.1-70b"), SCHEMES["fp8"]
    weights = weight_bytes(shape, scheme)
    h100 = HARDWARE["h100"]
    one = speed.decode_s(shape, weights, h100, scheme, 100, 1, nodes=1)
    two = speed.decode_s(shape, weights, replace(h100, nodes=2), scheme, 100, 1, nodes=2)
    assert one / 2 < two < one / 1.8


def test_large_batches_become_compute_bound():
    scheme = SCHEMES["bf16"]
    weights = weight_bytes(LLAMA_8B, scheme)
    small = speed.decode_step_s(LLAMA_8B, weights, DIGITS, scheme, 10, batch=1)
    big = speed.decode_step_s(LLAMA_8B, weights, DIGITS, scheme, 10, batch=4096)
    assert big == pytest.approx(4096 * 2 * LLAMA_8B.active_params / (125e12 * 0.5), rel=0.01)
    assert big > 10 * small
