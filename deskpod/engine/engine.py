"""The engine loop: schedule → execute → update, with text, stop conditions and outputs per request.

    out = scheduler.schedule()      # pure Python: which tokens of which requests this step
    result = runner.execute(out)    # tensors: forward pass over the batch, sampling
    scheduler.update(out, ...)      # pure Python: append tokens, finish requests, free their blocks
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from deskpod.engine.config import EngineConfig
from deskpod.engine.drafting import Drafter, Drafts
from deskpod.engine.lanes import Lanes
from deskpod.engine.loader import LoadedModel, kv_dtype_bytes, model_shape
from deskpod.engine.request import Request, RequestStatus
from deskpod.engine.runner import ModelRunner, TokenLogprob
from deskpod.engine.sampler import Sampler, SamplingParams
from deskpod.engine.structured import GrammarConstraint, StructuredOutputs
from deskpod.engine.scheduler import Scheduler, SchedulerConfig
from deskpod.engine.text import TextStream
from deskpod.errors import DeskpodError, InvalidRequest, LinkLost, PromptTooLong
from deskpod.plan.capacity import kv_blocks_for
from deskpod.plan.devices import available_memory_bytes

# Without a KV budget from the user, the pool may take this share of the memory free after loading: a
# desktop box runs other programs too (vLLM's 0.9 assumes a dedicated GPU).
DEFAULT_MEMORY_FRACTION = 0.5


FINISH_REASONS = {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                  RequestStatus.FINISHED_CANCELLED: "abort"}


@dataclass
class RequestOutput:
    """What one step added to one request."""

    request_id: str
    token_ids: list[int]  # new this step
    text: str  # new this step
    finish_reason: str | None  # None while running; "stop", "length", "abort", or "error" (see `error`)
    logprobs: list[TokenLogprob] | None
    num_prompt_tokens: int
    num_output_tokens: int
    arrival_time: float
    first_token_time: float | None
    error: str | None = None  # why the engine failed on this request (finish_reason "error"); the others go on
    input_fault: bool = False  # the error is the request's own settings' (deskpod refused them), not a bug
    prompt_logprobs: list[TokenLogprob] | None = None  # with the first token: one per prompt token after the first


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    kv_blocks_total: int
    kv_blocks_free: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    draft_tokens_total: int = 0  # speculative decoding: tokens proposed, and of them those the model confirmed
    accepted_tokens_total: int = 0


@dataclass
class _Tracked:
    """The engine's side of a request: its text and timing."""

    params: SamplingParams
    text: TextStream
    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    delta: str = ""
    eos: bool = False
    constraint: GrammarConstraint | None = None  # its structured output, which ends it when complete
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # gathered over the prompt's chunks
    drafter: Drafter | None = None  # speculative decoding's guesses at its next tokens


def kv_pool_blocks(loaded: LoadedModel, config: EngineConfig) -> int:
    """KV blocks from the budget: `kv_cache_gb`, else a share of the memory free now (weights loaded)."""
    free = available_memory_bytes(cuda=config.device.startswith("cuda"))
    budget = config.kv_cache_gb * 1e9 if config.kv_cache_gb else free * (config.memory_fraction or DEFAULT_MEMORY_FRACTION)
    # this box's layers and KV heads: all of them, or its share of a linked model
    shape = replace(model_shape(loaded.spec, loaded.label), num_layers=len(loaded.model.blocks),
                    num_kv_heads=loaded.model.kv_heads)
    blocks = kv_blocks_for(shape, int(budget), config.block_size, kv_dtype_bytes(config))
    context = min(config.context_for(loaded.spec.max_context), loaded.context)
    needed = -(-context // config.block_size)
    if blocks < needed:
        raise DeskpodError(
            f"the KV cache budget ({budget / 1e9:.2f} GB) holds {blocks * config.block_size:,} tokens, fewer than one "
            f"{context:,}-token context: raise --kv-cache-gb / --memory-fraction or lower --ctx"
        )
    # a pool larger than every slot's full context is never used
    return min(blocks, needed * config.max_num_seqs)


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig = EngineConfig(), num_blocks: int | None = None,
                 link=None):
        """`link`: the LinkHead of a model served across linked boxes (deskpod.link), whose state decides whether
        requests are taken."""
        # the weights are as the model was loaded, whatever the config says (what `auto` settings follow)
        config = replace(config, weights=loaded.weights)
        self.loaded, self.config, self.tokenizer = loaded, config, loaded.tokenizer
        self.link, self._link_generation = link, link.generation if link else 0
        self.context = min(config.context_for(loaded.spec.max_context), loaded.context)
        # a draft model loads before the KV pool takes its share of the memory left
        self._drafts = Drafts(config.speculative, loaded, config) if config.speculative else None
        num_blocks = num_blocks or kv_pool_blocks(loaded, config)
        sched = SchedulerConfig(config.max_num_seqs, max(config.max_num_batched_tokens, config.max_num_seqs),
                                config.max_waiting, config.block_size, num_blocks)
        lanes = link.pipeline_depth if link is not None else 1
        if lanes > 1 and num_blocks // lanes >= -(-self.context // config.block_size):
            # a pipeline: one lane of requests per box, their batches in flight at once
            self.scheduler: Scheduler | Lanes = Lanes(sched, self._stop_check, lanes, self._draft if config.speculative else None)
        else:
            self.scheduler = Scheduler(sched, self._stop_check, drafter=self._draft if config.speculative else None)
        self._in_flight: collections.deque = collections.deque()  # (lane, its SchedulerOutput, PendingStep)
        self._next_lane = 0
        self.runner = ModelRunner(loaded, num_blocks, config)
        self.structured = StructuredOutputs(self.tokenizer, loaded.spec.vocab_size)
        self._tracked: dict[str, _Tracked] = {}
        self._ids = itertools.count()
        self._prompt_tokens = self._generated_tokens = 0
        self._drafted = self._accepted = 0

    def chat_prompt(self, messages: list[dict], **options) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, **options)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    after: str | None = None, constraint: GrammarConstraint | None = None) -> str:
        """Queue a request; `after`: the id of a request with the same prompt (one of `n` choices), whose
        prompt blocks this one then shares instead of computing them again; `constraint`: its structured
        output's state, when the caller built it already (off the engine's thread)."""
        if self.link is not None and self.link.group is None:
            raise LinkLost(self.link.unavailable_reason())
        check_prompt(len(prompt_ids), self.context)
        check_token_ids({"prompt": prompt_ids, **params.token_ids()}, self.loaded.spec.vocab_size)
        request_id = request_id or f"req-{next(self._ids)}"
        if params.structured and constraint is None:
            constraint = self.structured.constraint(params.structured)  # InvalidRequest for a bad grammar
        end_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.tokenizer.eog_ids)
        request = Request(request_id, list(prompt_ids), params)
        request.cache_prefix = params.prompt_logprobs is None  # a cached prefix would skip the logits it needs
        self.scheduler.add(request, after=after)  # QueueFull when the queue is full
        self.runner.add(request_id, Sampler(params, prompt_ids, end_ids, constraint))
        text = TextStream(self.tokenizer, params.stop, params.include_stop_str_in_output, params.skip_special_tokens)
        drafter = self._drafts.new() if self._drafts else None
        self._tracked[request_id] = _Tracked(params, text, constraint=constraint, drafter=drafter)
        self._prompt_tokens += len(prompt_ids)
        return request_id

    def abort(self, request_id: str) -> bool:
        self._tracked.pop(request_id, None)
        return self.scheduler.cancel(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._in_flight)

    def step(self) -> list[RequestOutput]:
        if self.link is not None and self.link.generation != self._link_generation:
            # a box came back with an empty cache: blocks computed before hold none of its layers / heads
            self._in_flight.clear()
            self.scheduler.pool.forget_cached()
            self._link_generation = self.link.generation
        if isinstance(self.scheduler, Lanes):
            return self._pipelined_step()
        out = self.scheduler.schedule()
        return self._apply(self.scheduler, out, self.runner.execute(out))

    def _pipelined_step(self) -> list[RequestOutput]:
        """Submit the next idle lane's batch; once every lane has one in flight (or no other has work),
        collect the oldest. A lane is scheduled again only after its batch came back."""
        lanes = self.scheduler
        busy = {lane for lane, _, _ in self._in_flight}
        idle = [(self._next_lane + i) % lanes.count for i in range(lanes.count)]
        ready = next((lane for lane in idle if lane not in busy and lanes.has_work(lane)), None)
        if ready is not None:
            out = lanes.schedule(ready)
            self._next_lane = (ready + 1) % lanes.count
            try:
                self._in_flight.append((ready, out, self.runner.submit(out)))
            except LinkLost:
                self._in_flight.clear()
                raise
        if not self._in_flight or (len(self._in_flight) < lanes.count and
                                   any(lane not in busy | {ready} and lanes.has_work(lane) for lane in idle)):
            return []
        lane, out, pending = self._in_flight.popleft()
        try:
            result = self.runner.collect(pending)
        except LinkLost:
            self._in_flight.clear()
            raise
        return self._apply(lanes.lanes[lane], out, result)

    def _apply(self, scheduler: Scheduler, out, result) -> list[RequestOutput]:
        failed = [self._failed(request_id, why) for request_id, why in result.failed.items()]
        for request_id, entries in result.prompt_logprobs.items():
            if request_id in self._tracked:
                self._tracked[request_id].prompt_logprobs += entries
        self._count_drafts(out, result.tokens)
        advanced = scheduler.update(out, result.tokens)
        return [f for f in failed if f] + [self._output(r, n, result.logprobs.get(r.request_id)) for r, n in advanced]

    def _draft(self, request: Request) -> list[int]:
        """Speculative decoding's guesses at what follows `request`, as many as it may still generate."""
        tracked, spec = self._tracked.get(request.request_id), self.config.speculative
        if tracked is None or tracked.drafter is None:
            return []
        if spec.disable_by_batch_size and len(self.scheduler.running) >= spec.disable_by_batch_size:
            return []
        # room for the guesses and the token after them, within max_tokens and the context
        room = min(tracked.params.max_tokens - len(request.output_token_ids), self.context - request.num_tokens) - 1
        return tracked.drafter.propose(request.all_token_ids, min(spec.num_speculative_tokens, room))

    def _count_drafts(self, out, sampled: dict[str, list[int]]) -> None:
        for s in out.scheduled:
            if s.draft and s.request_id in sampled:
                self._drafted += len(s.draft)
                self._accepted += len(sampled[s.request_id]) - 1

    def _failed(self, request_id: str, error: Exception) -> RequestOutput | None:
        """End a request whose share of the step failed (the scheduler forgets it, its blocks are freed)."""
        request, tracked = self.scheduler.requests.get(request_id), self._tracked.pop(request_id, None)
        if request is None or tracked is None:
            return None
        self.scheduler.cancel(request_id)
        return RequestOutput(
            request_id=request_id, token_ids=[], text="", finish_reason="error", logprobs=None,
            num_prompt_tokens=request.num_prompt_tokens, num_output_tokens=len(request.output_token_ids),
            arrival_time=tracked.arrival, first_token_time=tracked.first_token,
            error=str(error) if isinstance(error, DeskpodError) else f"{type(error).__name__}: {error}",
            input_fault=isinstance(error, DeskpodError),
        )

    def stats(self) -> EngineStats:
        pool = self.scheduler.pool
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting), kv_usage=pool.usage,
            kv_blocks_total=self.scheduler.config.num_blocks, kv_blocks_free=pool.num_free,
            num_preemptions=self.scheduler.num_preemptions, prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._generated_tokens, draft_tokens_total=self._drafted,
            accepted_tokens_total=self._accepted,
        )

    def _stop_check(self, request: Request) -> RequestStatus | None:
        """Called by the scheduler with each new token: extend the text, decide whether the request ends."""
        tracked = self._tracked[request.request_id]
        token, params = request.output_token_ids[-1], tracked.params
        tracked.first_token = tracked.first_token or time.monotonic()
        self._generated_tokens += 1
        can_stop = len(request.output_token_ids) >= params.min_tokens  # (the sampler held end tokens back)
        # a complete structured output ends the request even under ignore_eos: no token could follow it
        complete = tracked.constraint is not None and tracked.constraint.finished
        if token in params.stop_token_ids or (token in self.tokenizer.eog_ids and (complete or not params.ignore_eos)):
            # an end token is not part of the reply, unless asked for as a stop token's text
            if token in params.stop_token_ids and params.include_stop_str_in_output:
                tracked.delta += tracked.text.push(token)
            else:
                tracked.eos = True
            tracked.delta += tracked.text.flush()
            return RequestStatus.FINISHED_STOPPED
        tracked.delta += tracked.text.push(token, can_stop)
        if complete:
            tracked.delta += tracked.text.flush()
            return RequestStatus.FINISHED_STOPPED
        if tracked.text.stopped:
            return RequestStatus.FINISHED_STOPPED
        if len(request.output_token_ids) >= params.max_tokens or request.num_tokens >= self.context:
            tracked.delta += tracked.text.flush()
            return RequestStatus.FINISHED_LENGTH
        return None

    def _output(self, request: Request, count: int, logprobs: list[TokenLogprob] | None) -> RequestOutput:
        """What the step added to `request`: its last `count` tokens (the end token left out)."""
        tracked = self._tracked[request.request_id]
        finished = request.status.finished
        token_ids = request.output_token_ids[len(request.output_token_ids) - count : len(request.output_token_ids) - tracked.eos]
        delta, tracked.delta = tracked.delta, ""
        if finished:
            del self._tracked[request.request_id]
        first = len(request.output_token_ids) == 1 and tracked.params.prompt_logprobs is not None
        return RequestOutput(
            request_id=request.request_id, token_ids=token_ids, text=delta,
            finish_reason=FINISH_REASONS[request.status] if finished else None,
            logprobs=logprobs[: len(token_ids)] if logprobs and token_ids else None,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=len(request.output_token_ids) - tracked.eos,
            arrival_time=tracked.arrival, first_token_time=tracked.first_token,
            prompt_logprobs=tracked.prompt_logprobs if first else None,
        )


def check_token_ids(fields: dict[str, Sequence[int]], vocab_size: int) -> None:
    """InvalidRequest naming the first field holding an id outside the vocabulary."""
    for name, ids in fields.items():
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequest(f"{name}: token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")


def check_prompt(n_prompt: int, context: int) -> None:
    if n_prompt == 0:
        raise PromptTooLong("the prompt is empty: give at least one token")
    if n_prompt >= context:
        raise PromptTooLong(
            f"the prompt has {n_prompt} tokens but the context holds {context}: shorten the prompt"
            " (or raise the context length if the model allows it)"
        )
