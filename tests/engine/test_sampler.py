"""SamplingParams validation and next-token selection, on hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch

from deskpod.engine.sampler import InvalidSamplingParams, Sampler, SamplingParams

# probabilities 0.5, 0.25, 0.125, 0.0625, ... over 8 tokens, shuffled so the best is not id 0
ORDER = [5, 2, 7, 0, 3, 6, 1, 4]  # ids from most to least likely
LOGITS = torch.empty(8).index_put_((torch.tensor(ORDER),), -torch.arange(8.0) * math.log(2))


def draws(params: SamplingParams, n: int, logits: torch.Tensor = LOGITS) -> list[int]:
    sampler = Sampler(params)
    return [sampler(logits) for _ in range(n)]


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("max_tokens", 0, "max_tokens"),
        ("temperature", -0.1, "temperature"),
        ("temperature", float("nan"), "temperature"),
        ("top_k", -1, "top_k"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.01, "top_p"),
        ("stop", ("",), "stop"),
        ("stop", (3,), "stop"),
    ],
)
def test_invalid_params_say_which_field(field, value, words):
    with pytest.raises(InvalidSamplingParams, match=words):
        SamplingParams(**{field: value})


def test_params_are_frozen():
    with pytest.raises(AttributeError):
        SamplingParams().temperature = 0  # type: ignore[misc]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0),
        SamplingParams(temperature=5.0, top_k=1),
        SamplingParams(temperature=5.0, top_p=1e-6),
    ],
    ids=["temperature 0", "top_k 1", "tiny top_p"],
)
def test_greedy_settings_always_pick_the_argmax(params):
    assert set(draws(params, 50)) == {ORDER[0]}
    noisy = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert draws(params, 1, noisy) == [int(noisy.argmax())]


def test_seed_reproduces_the_draws():
    params = SamplingParams(temperature=1.0, seed=1234)
    assert draws(params, 200) == draws(params, 200)
    others = {tuple(draws(SamplingParams(temperature=1.0, seed=s), 200)) for s in range(5)}
    assert len(others) == 5


def test_unseeded_samplers_differ():
    assert len({tuple(draws(SamplingParams(temperature=1.0), 50)) for _ in range(3)}) > 1


def test_temperature_one_follows_the_softmax():
    n = 4000
    counts = torch.bincount(torch.tensor(draws(SamplingParams(temperature=1.0, seed=0), n)), minlength=8)
    expected = torch.softmax(LOGITS, 0) * n
    # each count within 5 standard deviations of a binomial draw
    sd = (expected * (1 - expected / n)).sqrt()
    assert ((counts - expected).abs() <= 5 * sd + 1).all(), (counts, expected)


def test_low_temperature_sharpens_and_high_flattens():
    top = ORDER[0]
    cold = draws(SamplingParams(temperature=0.2, seed=0), 500).count(top)
    hot = draws(SamplingParams(temperature=5.0, seed=0), 500).count(top)
    assert cold > 480 and hot < 200  # p(top) is ~0.97 at 0.2 and ~0.17 at 5


def test_top_k_keeps_the_k_most_likely():
    assert set(draws(SamplingParams(temperature=10.0, top_k=3, seed=0), 300)) == set(ORDER[:3])


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # 0.5 + 0.25 = 0.75 reaches 0.7, so exactly the two best survive; at 0.76 the third joins
    assert set(draws(SamplingParams(top_p=0.7, seed=0), 300)) == set(ORDER[:2])
    assert set(draws(SamplingParams(top_p=0.76, seed=0), 300)) == set(ORDER[:3])


def test_top_k_and_top_p_together():
    # top_k=4 renormalizes to 8/15, 4/15, 2/15, 1/15; top_p=0.7 then keeps the best two (12/15 >= 0.7)
    assert set(draws(SamplingParams(top_k=4, top_p=0.7, seed=0), 300)) == set(ORDER[:2])


def test_a_top_p_too_small_for_float32_keeps_the_best_token():
    assert set(draws(SamplingParams(top_p=5e-324, seed=0), 20)) == {ORDER[0]}


def test_a_repetition_penalty_near_zero_makes_a_seen_positive_logit_certain():
    # 0.5 / 5e-324 is +inf in float32: its limit, the largest float, not a NaN in the softmax
    sampler = Sampler(SamplingParams(repetition_penalty=5e-324, seed=0), prompt_ids=[2])
    assert {sampler(torch.tensor([1.0, 2.0, 0.5])) for _ in range(10)} == {2}
