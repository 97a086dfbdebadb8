"""One sequence from prompt to finish on the real SmolLM2: end of generation, stop strings, length limits,
and streamed text that adds up to the completion.

Greedy on "The capital of France is" (raw) with float32 weights gives " Paris.\\n\\nThe answer is: 2018-01-22
12:12:53." and then the end-of-sequence token, as transformers does in float32 (see test_reference.py); the
texts below are that sequence's, so these tests run the float32 model."""

from __future__ import annotations

import pytest

from deskpod.engine.config import EngineConfig
from deskpod.engine.generate import Completion, generate, stream
from deskpod.engine.sampler import SamplingParams
from deskpod.errors import PromptTooLong

GREEDY_TEXT = " Paris.\n\nThe answer is: 2018-01-22 12:12:53."


@pytest.fixture(scope="module")
def france(reference) -> list[int]:
    [raw] = [r for r in reference["results"] if r["mode"] == "raw" and r["prompt"] == "The capital of France is"]
    return raw["prompt_token_ids"]


def greedy(**options) -> SamplingParams:
    return SamplingParams(temperature=0, **options)


def run_stream(lm, ids, params) -> tuple[list[str], Completion]:
    it = stream(lm, ids, params)
    deltas = []
    while True:
        try:
            deltas.append(next(it))
        except StopIteration as done:
            return deltas, done.value


def test_end_of_sequence_finishes_with_stop(smollm2_float32, france):
    out = generate(smollm2_float32, france, greedy(max_tokens=64))
    assert out.finish_reason == "stop"
    assert out.text == GREEDY_TEXT == smollm2_float32.tokenizer.decode(out.token_ids)
    assert out.prompt_token_ids == france
    assert not set(out.token_ids) & smollm2_float32.tokenizer.eog_ids  # the end token is not part of the output


def test_ignore_eos_runs_to_max_tokens(smollm2_float32, france):
    eos = smollm2_float32.tokenizer.special.eos_id
    out = generate(smollm2_float32, france, greedy(max_tokens=31, ignore_eos=True))
    assert out.finish_reason == "length" and len(out.token_ids) == 31
    assert out.token_ids.index(eos) == 29  # where it would have stopped
    assert out.text.startswith(GREEDY_TEXT)


def test_max_tokens_finishes_with_length(smollm2_float32, france):
    out = generate(smollm2_float32, france, greedy(max_tokens=4))
    assert (out.text, out.finish_reason, len(out.token_ids)) == (" Paris.\n\n", "length", 4)


@pytest.mark.parametrize(
    ("stop", "text"),
    [
        (("\n",), " Paris."),
        ((":", "Paris"), " "),  # the earliest match wins, whatever the order of the stops
        (("2018-01",), " Paris.\n\nThe answer is: "),  # a stop string spread over seven tokens
        (("Paris.\n\nThe",), " "),
    ],
)
def test_stop_strings_cut_the_text(smollm2_float32, france, stop, text):
    deltas, out = run_stream(smollm2_float32, france, greedy(max_tokens=40, stop=stop))
    assert (out.text, out.finish_reason) == (text, "stop")
    assert "".join(deltas) == text
    assert all(deltas)


def test_stop_string_prefix_is_held_back_then_released(smollm2_float32, france):
    # "2018-0" looks like the start of "2018-02" until "1" arrives: it must not be shown early, nor lost
    deltas, out = run_stream(smollm2_float32, france, greedy(max_tokens=40, stop=("2018-02",)))
    assert out.text == GREEDY_TEXT and out.finish_reason == "stop"
    assert "".join(deltas) == GREEDY_TEXT
    shown = [len("".join(deltas[: i + 1])) for i in range(len(deltas))]
    start = GREEDY_TEXT.index("2018")
    assert not any(start < n < start + len("2018-01") for n in shown)  # never cut inside the held span


def test_streamed_deltas_add_up_to_the_completion(smollm2_float32, reference):
    for r in reference["results"][:2]:
        deltas, out = run_stream(smollm2_float32, r["prompt_token_ids"], greedy(max_tokens=12))
        assert "".join(deltas) == out.text == smollm2_float32.tokenizer.decode(out.token_ids)
        assert len(deltas) > 1 and all(deltas)


def test_seeded_sampling_is_reproducible(smollm2_float32, france):
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=7, max_tokens=12, ignore_eos=True)
    first, second = generate(smollm2_float32, france, params), generate(smollm2_float32, france, params)
    assert first.token_ids == second.token_ids and first.text == second.text


def test_context_limits_the_number_of_new_tokens(smollm2_float32, france):
    out = generate(smollm2_float32, france, greedy(max_tokens=100), EngineConfig(context=len(france) + 3))
    assert (out.text, out.finish_reason) == (" Paris.\n", "length")


def test_prompt_longer_than_the_context(smollm2_float32, france):
    with pytest.raises(PromptTooLong, match=f"{len(france)} tokens but the context holds 4"):
        generate(smollm2_float32, france, greedy(), EngineConfig(context=4))
    with pytest.raises(PromptTooLong, match="context holds 8192"):  # the model's own limit, whatever is asked
        generate(smollm2_float32, [504] * 8192, greedy(), EngineConfig(context=100_000))


def test_empty_prompt(smollm2_float32):
    with pytest.raises(PromptTooLong, match="empty"):
        generate(smollm2_float32, [], greedy())
