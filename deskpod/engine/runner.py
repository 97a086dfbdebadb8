"""The one part of the engine loop that touches tensors: run a scheduled step, sample the next tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deskpod.engine.attention import AttentionBatch, PagedKVCache
from deskpod.engine.loader import LoadedModel
from deskpod.engine.sampler import Sampler
from deskpod.engine.scheduler import SchedulerOutput


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...]  # the most likely tokens: (id, text, logprob)


@dataclass(frozen=True)
class StepResult:
    tokens: dict[str, int]  # request id -> sampled token, for the requests that sampled
    logprobs: dict[str, TokenLogprob]  # for the requests that asked for them


class ModelRunner:
    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int):
        cfg = loaded.config
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        # empty, not zeros: a slot is always written before attention reads it, and untouched pages of
        # a large pool cost no memory until sequences reach them
        self.cache = PagedKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, num_blocks, block_size, alloc=torch.empty)
        self.block_size = block_size
        self._samplers: dict[str, Sampler] = {}  # per request: its seeded generator survives preemption

    def execute(self, out: SchedulerOutput) -> StepResult:
        for request_id in out.finished_ids:
            self._samplers.pop(request_id, None)
        if not out.scheduled:
            return StepResult({}, {})
        ids = torch.tensor([t for s in out.scheduled for t in s.token_ids])
        batch = AttentionBatch.build([(len(s.token_ids), s.start, list(s.block_table), s.sample) for s in out.scheduled], self.block_size)
        logits = self.model.forward_batch(ids, batch, self.cache)  # one row per sampling request, in order
        tokens, logprobs = {}, {}
        for row, s in zip(logits, (s for s in out.scheduled if s.sample)):
            sampler = self._samplers.get(s.request_id) or self._samplers.setdefault(s.request_id, Sampler(s.params))
            tokens[s.request_id] = token = sampler(row)
            if s.params.logprobs is not None:
                logprobs[s.request_id] = self._logprob(row, token, s.params.logprobs)
        return StepResult(tokens, logprobs)

    def _logprob(self, logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
        logp = torch.log_softmax(logits.float(), dim=-1)
        best = torch.topk(logp, top) if top else None
        text = self.tokenizer.token_text
        ranked = tuple((int(i), text(int(i)), float(v)) for v, i in zip(*best)) if best else ()
        return TokenLogprob(token, text(token), float(logp[token]), ranked)
