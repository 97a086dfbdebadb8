"""Generation without a server: one request or a batch, run to completion on a private engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from deskpod.engine.engine import EngineConfig, LLMEngine
from deskpod.engine.loader import LoadedModel
from deskpod.engine.sampler import SamplingParams

__all__ = ["Completion", "generate", "generate_batch", "stream"]


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"


def _engine(lm: LoadedModel, prompts: list[list[int]], params: SamplingParams, context: int | None) -> LLMEngine:
    """An engine whose KV pool holds exactly these requests, all at once (it checks their lengths)."""
    context = min(context or lm.config.max_context, lm.config.max_context)
    block = 16
    blocks = sum(-(-min(len(ids) + params.max_tokens, context) // block) for ids in prompts)
    config = EngineConfig(max_num_seqs=len(prompts), max_waiting=len(prompts), block_size=block, context=context)
    return LLMEngine(lm, config, num_blocks=blocks)


def stream(lm: LoadedModel, prompt_ids: list[int], params: SamplingParams, context: int | None = None) -> Iterator[str]:
    """Yields text deltas; the returned Completion (StopIteration.value) holds ids, text and finish reason."""
    engine = _engine(lm, [prompt_ids], params, context)
    engine.add_request(prompt_ids, params, "0")
    done = Completion(list(prompt_ids))
    while engine.has_work():
        for out in engine.step():
            done.token_ids += out.token_ids
            done.text += out.text
            done.finish_reason = out.finish_reason
            if out.text:
                yield out.text
    return done


def generate(lm: LoadedModel, prompt_ids: list[int], params: SamplingParams, context: int | None = None) -> Completion:
    return generate_batch(lm, [prompt_ids], params, context)[0]


def generate_batch(lm: LoadedModel, prompts: list[list[int]], params: SamplingParams, context: int | None = None) -> list[Completion]:
    """All prompts decoded together (continuous batching), results in order."""
    engine = _engine(lm, prompts, params, context)
    done = {str(i): Completion(list(ids)) for i, ids in enumerate(prompts)}
    for request_id, ids in enumerate(prompts):
        engine.add_request(ids, params, str(request_id))
    while engine.has_work():
        for out in engine.step():
            c = done[out.request_id]
            c.token_ids += out.token_ids
            c.text += out.text
            c.finish_reason = out.finish_reason
    return list(done.values())
