"""Prompt lookup's guesses: the longest suffix that occurred before, its latest occurrence, what followed it."""

import random

import pytest

from deskpod.engine.config import SpeculativeConfig
from deskpod.engine.drafting import NgramDrafter
from deskpod.errors import DeskpodError


def lookup(tokens: list[int], k: int, longest: int, shortest: int) -> list[int]:
    """The rule written out plainly: for n from longest down, the latest earlier occurrence of the last n tokens."""
    for n in range(longest, shortest - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        for end in range(len(tokens) - 1, n - 1, -1):
            if tokens[end - n : end] == suffix:
                return tokens[end : end + k]
    return []


def test_the_longest_match_wins_and_its_latest_occurrence():
    drafter = NgramDrafter(SpeculativeConfig(prompt_lookup_max=3, prompt_lookup_min=1))
    #         0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [5, 1, 2, 9, 7, 1, 2, 8, 4, 0, 1, 2]
    assert drafter.propose(tokens, 3) == [8, 4, 0]  # "1 2" ended last at 7; "0 1 2" never occurred before
    tokens += [3]  # "2 3", "3" never occurred: nothing to propose
    assert drafter.propose(tokens, 3) == []


def test_guesses_stop_at_the_end_of_the_text_and_at_k():
    drafter = NgramDrafter(SpeculativeConfig(prompt_lookup_max=2, prompt_lookup_min=2))
    assert drafter.propose([4, 6, 4, 6], 5) == [4, 6]  # "4 6" ended at 2: what followed runs to the end
    assert drafter.propose([4, 6, 4, 6, 4], 1) == [6]  # "6 4" ended at 3
    assert drafter.propose([4, 6, 4, 6, 4], 0) == []
    assert drafter.propose([4], 3) == []


@pytest.mark.parametrize("seed", range(4))
def test_growing_text_matches_the_plain_rule(seed):
    rng = random.Random(seed)
    longest, shortest = rng.choice([(4, 2), (3, 1), (5, 5)])
    drafter = NgramDrafter(SpeculativeConfig(prompt_lookup_max=longest, prompt_lookup_min=shortest))
    tokens = [rng.randrange(6) for _ in range(rng.randint(1, 30))]
    proposals = 0
    for _ in range(300):
        k = rng.randint(1, 6)
        expected = lookup(tokens, k, longest, shortest)
        assert drafter.propose(tokens, k) == expected
        proposals += bool(expected)
        tokens += [rng.randrange(6) for _ in range(rng.choice([1, 1, 1, 3]))]  # accepted guesses come several at once
    assert proposals > 100


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"method": "eagle"}', "method must be one of ngram"),
        ('{"num_speculative_tokens": 0}', "num_speculative_tokens must be an integer from 1 to 64"),
        ('{"num_speculative_tokens": true}', "num_speculative_tokens must be an integer"),
        ('{"prompt_lookup_min": 3, "prompt_lookup_max": 2}', "prompt_lookup_max must be an integer, at least prompt_lookup_min (3)"),
        ('{"disable_by_batch_size": 0}', "disable_by_batch_size must be an integer, at least 1"),
        ('{"method": "eagle"}', "method must be one of ngram, draft_model"),
        ('{"draft_model": "draft.gguf", "num_speculative_tokens": 4}', "unknown key(s) 'draft_model'"),
        ('{"method": "draft_model"}', "method draft_model needs a model"),
        ('{"method": "ngram", "model": "draft.gguf"}', "method draft_model needs a model (a store name or a path), and only it"),
        ('{"model": ""}', "model must be a store name or a path"),
        ('{"model": "draft.gguf", "prompt_lookup_max": 3}', "prompt_lookup_max apply to method ngram, not draft_model"),
        ("[4]", "must be a JSON object"),
        ("{method: ngram}", "is not JSON"),
    ],
)
def test_the_option_refuses_what_it_does_not_understand_by_name(text, message):
    with pytest.raises(DeskpodError, match="--speculative-config") as error:
        SpeculativeConfig.from_json(text)
    assert message in str(error.value)


def test_the_option_reads_vllms_json():
    config = SpeculativeConfig.from_json('{"method": "ngram", "num_speculative_tokens": 6, "prompt_lookup_max": 5}')
    assert (config.num_speculative_tokens, config.prompt_lookup_max, config.prompt_lookup_min) == (6, 5, 2)
    assert SpeculativeConfig.from_json(None) is None
    draft = SpeculativeConfig.from_json('{"model": "qwen2.5-coder-0.5b", "num_speculative_tokens": 3}')  # vLLM's form
    assert (draft.method, draft.model, draft.num_speculative_tokens) == ("draft_model", "qwen2.5-coder-0.5b", 3)
