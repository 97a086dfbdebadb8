"""The one part of the engine loop that touches tensors: run a scheduled step, sample the next tokens.

A request fails alone: its sampler raising fails that request only, and a forward pass that raises is
run again one request at a time, so the request at fault is found and the others' tokens still come back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from deskpod.engine.attention import AttentionBatch, PagedKVCache
from deskpod.engine.config import EngineConfig
from deskpod.engine.loader import TORCH_DTYPES, LoadedModel
from deskpod.engine.sampler import Sampler
from deskpod.engine.scheduler import ScheduledRequest, SchedulerOutput

log = logging.getLogger(__name__)


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
    failed: dict[str, str] = field(default_factory=dict)  # request id -> why its share of the step failed


class ModelRunner:
    def __init__(self, loaded: LoadedModel, num_blocks: int, config: EngineConfig = EngineConfig()):
        spec = loaded.spec
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.device = torch.device(config.device)
        # empty, not zeros: a slot is always written before attention reads it, and untouched pages of
        # a large pool cost no memory until sequences reach them
        self.cache = PagedKVCache(spec.num_layers, spec.num_kv_heads, spec.head_dim, num_blocks, config.block_size,
                                  dtype=TORCH_DTYPES[config.dtype], device=self.device, alloc=torch.empty)
        self.block_size = config.block_size
        self._samplers: dict[str, Sampler] = {}  # per request: its seeded generator survives preemption

    def execute(self, out: SchedulerOutput) -> StepResult:
        for request_id in out.finished_ids:
            self._samplers.pop(request_id, None)
        if not out.scheduled:
            return StepResult({}, {})
        try:
            return self._run(out.scheduled)
        except Exception as e:  # noqa: BLE001 - whatever broke, find whose share it was
            if len(out.scheduled) == 1:
                log.exception("forward pass failed for request %s", out.scheduled[0].request_id)
                return StepResult({}, {}, {out.scheduled[0].request_id: _reason(e)})
            log.warning("forward pass of %d requests failed (%s); running them one at a time", len(out.scheduled), e)
            return _merge([self.execute(SchedulerOutput((s,))) for s in out.scheduled])

    def _run(self, scheduled: tuple[ScheduledRequest, ...]) -> StepResult:
        ids = torch.tensor([t for s in scheduled for t in s.token_ids], device=self.device)
        batch = AttentionBatch.build([(len(s.token_ids), s.start, list(s.block_table), s.sample) for s in scheduled],
                                     self.block_size).to(self.device)
        logits = self.model.forward_batch(ids, batch, self.cache).float()  # one row per sampling request, in order
        result = StepResult({}, {})
        for row, s in zip(logits.cpu(), (s for s in scheduled if s.sample)):
            try:
                self._sample(s, row, result)
            except Exception as e:  # noqa: BLE001 - this request's sampling only
                log.exception("sampling failed for request %s", s.request_id)
                result.failed[s.request_id] = _reason(e)
        return result

    def _sample(self, s: ScheduledRequest, row: torch.Tensor, result: StepResult) -> None:
        sampler = self._samplers.get(s.request_id) or self._samplers.setdefault(s.request_id, Sampler(s.params))
        result.tokens[s.request_id] = token = sampler(row)
        if s.params.logprobs is not None:
            result.logprobs[s.request_id] = self._logprob(row, token, s.params.logprobs)

    def _logprob(self, logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
        logp = torch.log_softmax(logits, dim=-1)
        best = torch.topk(logp, top) if top else None
        text = self.tokenizer.token_text
        ranked = tuple((int(i), text(int(i)), float(v)) for v, i in zip(*best)) if best else ()
        return TokenLogprob(token, text(token), float(logp[token]), ranked)


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def _merge(results: list[StepResult]) -> StepResult:
    merged = StepResult({}, {})
    for r in results:
        merged.tokens.update(r.tokens)
        merged.logprobs.update(r.logprobs)
        merged.failed.update(r.failed)
    return merged
