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
from deskpod.engine.loader import LoadedModel, kv_torch_dtype
from deskpod.engine.sampler import Sampler
from deskpod.engine.scheduler import ScheduledRequest, SchedulerOutput
from deskpod.errors import DeskpodError, LinkLost

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...]  # the most likely tokens: (id, text, logprob)
    rank: int = 1  # 1 + how many tokens were more likely


@dataclass(frozen=True)
class StepResult:
    tokens: dict[str, list[int]]  # request id -> sampled tokens (one, or a draft's kept part and one more)
    logprobs: dict[str, list[TokenLogprob]]  # for the requests that asked for them, one per sampled token
    failed: dict[str, Exception] = field(default_factory=dict)  # request id -> why its share of the step failed
    prompt_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)  # prompt tokens computed this step


def kv_cache_for(loaded: LoadedModel, num_blocks: int, config: EngineConfig) -> PagedKVCache:
    """The KV pool of this box's layers and KV heads (all of them, unless linked). Empty, not zeros: a slot is
    always written before attention reads it, and untouched pages of a large pool cost no memory until
    sequences reach them."""
    return PagedKVCache(len(loaded.model.blocks), loaded.model.kv_heads, loaded.spec.head_dim, num_blocks,
                        config.block_size, dtype=kv_torch_dtype(config), device=torch.device(config.device),
                        alloc=torch.empty)


class ModelRunner:
    def __init__(self, loaded: LoadedModel, num_blocks: int, config: EngineConfig = EngineConfig()):
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.device = torch.device(config.device)
        self.cache = kv_cache_for(loaded, num_blocks, config)
        self.block_size = config.block_size
        self._samplers: dict[str, Sampler] = {}  # per request: its state survives preemption
        self._prompt_logprobs_done: dict[str, int] = {}  # prompt positions already reported (a preempted
        # request computes its prompt again)

    def add(self, request_id: str, sampler: Sampler) -> None:
        self._samplers[request_id] = sampler

    def execute(self, out: SchedulerOutput) -> StepResult:
        self._forget(out.finished_ids)
        if not out.scheduled:
            return StepResult({}, {})
        try:
            return self._run(out.scheduled)
        except LinkLost:  # a linked box went away: no request is at fault, none can go on
            raise
        except Exception as e:  # noqa: BLE001 - whatever broke, find whose share it was
            if len(out.scheduled) == 1:
                log.exception("forward pass failed for request %s", out.scheduled[0].request_id)
                return StepResult({}, {}, {out.scheduled[0].request_id: e})
            log.warning("forward pass of %d requests failed (%s); running them one at a time", len(out.scheduled), e)
            return _merge([self.execute(SchedulerOutput((s,))) for s in out.scheduled])

    # --- a step in two halves, for pipelines: submit() starts it, collect() waits for its logits and samples.
    # Between them the engine submits another lane's step, so every box of a pipeline has work.

    def submit(self, out: SchedulerOutput) -> PendingStep:
        self._forget(out.finished_ids)
        if not out.scheduled:
            return PendingStep(out.scheduled, [], None)
        ids, rows, batch = self._inputs(out.scheduled)
        try:
            return PendingStep(out.scheduled, rows, self.model.start_batch(ids, batch, self.cache))
        except LinkLost:
            raise
        except Exception as e:  # noqa: BLE001 - the batch's requests fail, the engine goes on
            return PendingStep(out.scheduled, rows, None, e)

    def collect(self, pending: PendingStep) -> StepResult:
        if pending.error is None and pending.handle is not None:
            try:
                return self._sample_all(pending.scheduled, pending.rows, self.model.finish_batch(pending.handle).float().cpu())
            except LinkLost:
                raise
            except Exception as e:  # noqa: BLE001
                pending.error = e
        if pending.error is not None:
            log.error("a pipelined step of %d requests failed: %s", len(pending.scheduled), pending.error)
            return StepResult({}, {}, {s.request_id: pending.error for s in pending.scheduled})
        return StepResult({}, {})

    def _forget(self, finished_ids) -> None:
        for request_id in finished_ids:
            self._samplers.pop(request_id, None)
            self._prompt_logprobs_done.pop(request_id, None)

    def _inputs(self, scheduled: tuple[ScheduledRequest, ...]) -> tuple[torch.Tensor, list[int], AttentionBatch]:
        ids = torch.tensor([t for s in scheduled for t in s.token_ids], device=self.device)
        rows = [self._logit_rows(s) for s in scheduled]
        sequences = []
        for s, n in zip(scheduled, rows):
            table = list(s.block_table)
            if s.draft:  # each row a decoding token of its own (its keys up to itself): the same arithmetic as
                # decoding one token a step, so checking a draft never changes a reply
                sequences += [(1, s.start + j, table, 1) for j in range(len(s.token_ids))]
            else:
                sequences.append((len(s.token_ids), s.start, table, n))
        return ids, rows, AttentionBatch.build(sequences, self.block_size).to(self.device)

    def _run(self, scheduled: tuple[ScheduledRequest, ...]) -> StepResult:
        ids, rows, batch = self._inputs(scheduled)
        logits = self.model.forward_batch(ids, batch, self.cache).float().cpu()  # the wanted rows, in batch order
        return self._sample_all(scheduled, rows, logits)

    def _sample_all(self, scheduled: tuple[ScheduledRequest, ...], rows: list[int], logits: torch.Tensor) -> StepResult:
        result, first = StepResult({}, {}), 0
        for s, n in zip(scheduled, rows):
            mine, first = logits[first : first + n], first + n
            try:
                if n > int(s.sample) and not s.draft:
                    self._prompt_logprobs(s, mine, result)
                if s.sample:
                    self._sample(s, mine[-1 - len(s.draft) :], result)
            except Exception as e:  # noqa: BLE001 - this request's sampling only
                if not isinstance(e, DeskpodError):  # a refusal of the request's own settings is not a bug
                    log.exception("sampling failed for request %s", s.request_id)
                result.failed[s.request_id] = e
        return result

    def _logit_rows(self, s: ScheduledRequest) -> int:
        """How many of the chunk's last rows need logits: the last when it samples (and the draft's rows), every
        row of a prompt chunk when the request wants its prompt's logprobs."""
        if s.draft:
            return 1 + len(s.draft)
        sampler, last_prompt = self._samplers[s.request_id], len(self._samplers[s.request_id].prompt_ids) - 1
        if sampler.params.prompt_logprobs is None or self._prompt_logprobs_done.get(s.request_id, 0) >= last_prompt:
            return int(s.sample)
        # not all reported yet, so no token was sampled: the chunk lies within the prompt
        return max(0, min(s.start + len(s.token_ids), last_prompt) - s.start) + int(s.sample)

    def _prompt_logprobs(self, s: ScheduledRequest, logits: torch.Tensor, result: StepResult) -> None:
        """Row j predicts the prompt token at position start + j + 1."""
        sampler = self._samplers[s.request_id]
        done, top = self._prompt_logprobs_done.get(s.request_id, 0), sampler.params.prompt_logprobs
        entries = []
        for j in range(len(logits) - int(s.sample)):
            position = s.start + j + 1
            if position > done:
                entries.append(self._logprob(logits[j], sampler.prompt_ids[position], top))
        if entries:
            self._prompt_logprobs_done[s.request_id] = s.start + len(logits) - int(s.sample)
            result.prompt_logprobs[s.request_id] = entries

    def _sample(self, s: ScheduledRequest, rows: torch.Tensor, result: StepResult) -> None:
        """Sample row after row (one, or one per draft token and the one after) while each agrees with the draft.
        Each token is drawn from the distribution it would be drawn from a token a step, by the same sampler
        state, so a draft changes how fast the reply comes, never what it is, greedy or seeded."""
        sampler, tokens, logprobs = self._samplers[s.request_id], [], []
        for j, row in enumerate(rows):
            token = sampler(row)
            tokens.append(token)
            if sampler.params.logprobs is not None:
                logprobs.append(self._logprob(row, token, sampler.params.logprobs))
            if j == len(s.draft) or token != s.draft[j] or sampler.ended:
                break
        result.tokens[s.request_id] = tokens
        if logprobs:
            result.logprobs[s.request_id] = logprobs

    def _logprob(self, logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
        logp = torch.log_softmax(logits, dim=-1)
        best = torch.topk(logp, top) if top else None
        text = self.tokenizer.token_text
        ranked = tuple((int(i), text(int(i)), float(v)) for v, i in zip(*best)) if best else ()
        rank = 1 + int((logp > logp[token]).sum())
        return TokenLogprob(token, text(token), float(logp[token]), ranked, rank)


@dataclass
class PendingStep:
    scheduled: tuple[ScheduledRequest, ...]
    rows: list[int]  # logit rows per request
    handle: object  # the model's start_batch result, for its finish_batch
    error: Exception | None = None


def _merge(results: list[StepResult]) -> StepResult:
    merged = StepResult({}, {})
    for r in results:
        merged.tokens.update(r.tokens)
        merged.logprobs.update(r.logprobs)
        merged.failed.update(r.failed)
        merged.prompt_logprobs.update(r.prompt_logprobs)
    return merged
