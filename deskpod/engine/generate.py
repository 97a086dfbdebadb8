"""Generation without a server: one request or a batch, run to completion on a private engine."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator

from deskpod.engine.config import EngineConfig
from deskpod.engine.engine import LLMEngine, RequestOutput
from deskpod.engine.loader import LoadedModel
from deskpod.engine.runner import TokenLogprob
from deskpod.engine.sampler import SamplingParams

__all__ = ["Completion", "generate", "generate_batch", "stream"]


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", or "error" (see `error`)
    logprobs: list[TokenLogprob] | None = None  # one per token, when SamplingParams(logprobs=k) asked for them
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token after the first (prompt_logprobs=k)
    error: str | None = None  # why the engine failed on this request (the others of a batch are unaffected)

    def add(self, out: RequestOutput) -> None:
        self.error = out.error or self.error
        self.token_ids += out.token_ids
        self.text += out.text
        self.finish_reason = out.finish_reason
        if out.logprobs:
            self.logprobs = (self.logprobs or []) + out.logprobs
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs


def _engine(lm: LoadedModel, prompts: list[list[int]], params: SamplingParams, config: EngineConfig) -> LLMEngine:
    """An engine whose KV pool holds exactly these requests, all at once (it checks their lengths)."""
    context = min(config.context_for(lm.spec.max_context), lm.context)
    block = config.block_size
    blocks = sum(-(-min(len(ids) + params.max_tokens, context) // block) for ids in prompts)
    config = replace(config, max_num_seqs=len(prompts), max_waiting=len(prompts), context=context)
    return LLMEngine(lm, config, num_blocks=blocks)


def stream(lm: LoadedModel, prompt_ids: list[int], params: SamplingParams,
           config: EngineConfig = EngineConfig()) -> Iterator[str]:
    """Yields text deltas; the returned Completion (StopIteration.value) holds ids, text and finish reason."""
    engine = _engine(lm, [prompt_ids], params, config)
    engine.add_request(prompt_ids, params, "0")
    done = Completion(list(prompt_ids))
    while engine.has_work():
        for out in engine.step():
            done.add(out)
            if out.text:
                yield out.text
    return done


def generate(lm: LoadedModel, prompt_ids: list[int], params: SamplingParams,
             config: EngineConfig = EngineConfig()) -> Completion:
    return generate_batch(lm, [prompt_ids], params, config)[0]


def generate_batch(lm: LoadedModel, prompts: list[list[int]], params: SamplingParams,
                   config: EngineConfig = EngineConfig()) -> list[Completion]:
    """All prompts decoded together (continuous batching), results in order."""
    engine = _engine(lm, prompts, params, config)
    done = {str(i): Completion(list(ids)) for i, ids in enumerate(prompts)}
    for request_id, ids in enumerate(prompts):
        engine.add_request(ids, params, str(request_id))
    while engine.has_work():
        for out in engine.step():
            done[out.request_id].add(out)
    return list(done.values())
