"""Comparing two greedy generations that may round differently (vLLM's check_logprobs_close)."""

from __future__ import annotations

from deskpod.engine.generate import Completion


def assert_greedy_close(a: Completion, b: Completion) -> None:
    """Identical tokens up to a first divergence, where each side's token must be among the other's most
    likely (logprobs=k asked for): a near-tie decided differently, not a wrong computation. After it the
    sequences continue from different contexts, so nothing more is compared."""
    for step, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
        if x == y:
            continue
        top_a = {t for t, _, _ in a.logprobs[step].top}
        top_b = {t for t, _, _ in b.logprobs[step].top}
        assert y in top_a and x in top_b, f"step {step}: {x} vs {y}, not a near-tie ({top_a} / {top_b})"
        return
    assert len(a.token_ids) == len(b.token_ids)
