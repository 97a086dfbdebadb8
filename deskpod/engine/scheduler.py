"""Continuous batching: which requests compute which tokens this step, over a paged KV block pool.

The engine loop is three calls:

    out = scheduler.schedule()          # what to compute: tokens, positions, block tables
    sampled = runner.execute(out)       # {request_id: next token} for the requests that sample
    scheduler.update(out, sampled)      # append them, finish requests, free their blocks

Each step offers every request `num_tokens - num_computed_tokens` tokens, capped by the step's token
budget (`max_num_batched_tokens`): first the running requests, then the waiting ones while budget,
sequence slots and blocks last, all first come first served. A prompt that does not fit the budget left
is cut into chunks, and as nobody overtakes it, it is the only one in the middle of its prefill and the
last of the running requests: everyone else's decoding goes first, a long prompt never stalls it.

When a running request needs a block and the pool has none, the latest-arrived running request is
preempted: its blocks go back (its full ones stay in the prefix cache while nobody needs their memory)
and it waits at the front of the queue to compute all its tokens again, output kept, so it resumes
exactly where it stopped.

With a drafter (speculative decoding), a decoding request computes its last token and the drafter's guesses
for the next ones in one step, every row sampled in turn: the guesses up to the first the sampler disagrees
with are kept, and the sampled token after them. Only the kept tokens count as computed, so the keys and
values of the rejected guesses are overwritten by the next step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from deskpod.engine.block_pool import BlockPool
from deskpod.engine.request import Request, RequestStatus
from deskpod.errors import DeskpodError, PromptTooLong


class QueueFull(DeskpodError):
    """The waiting queue is at `max_waiting`: try again later (the server answers 429)."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 32  # requests running at once
    max_num_batched_tokens: int = 512  # tokens computed per step, all requests together: the chunk budget
    max_waiting: int = 256  # bounded waiting queue; add() beyond it raises QueueFull
    block_size: int = 16  # tokens per KV block
    num_blocks: int = 1024  # KV blocks in the pool (from the planner)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting", "block_size", "num_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"SchedulerConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens < self.max_num_seqs:  # else some decodes would wait a step
            raise ValueError(
                f"SchedulerConfig.max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs}), so that every running request decodes every step"
            )

    @property
    def max_tokens_per_request(self) -> int:
        """The most tokens one request can hold: the whole pool."""
        return self.num_blocks * self.block_size


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step: compute `token_ids` at positions `start, start + 1, ...`."""

    request_id: str
    token_ids: tuple[int, ...]
    start: int
    block_table: tuple[int, ...]  # position p's keys and values go to block block_table[p // block_size]
    sample: bool  # True when the chunk reaches the request's last token: sample the next one
    params: Any  # the request's sampling parameters, opaque to the scheduler
    draft: tuple[int, ...] = ()  # guesses at the tokens after the request's last, the end of token_ids: each row
    # from the request's last on is sampled in turn until one differs from the guess before it


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledRequest, ...]
    preempted_ids: tuple[str, ...] = ()  # preempted this step: they will compute everything again
    finished_ids: tuple[str, ...] = ()  # finished or cancelled since the last step: drop their state

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)


StopCheck = Callable[[Request], RequestStatus | None]
"""Called after each sampled token: a FINISHED_* status to end the request, or None to go on."""

Drafter = Callable[[Request], Sequence[int]]
"""Guesses at the tokens that follow a decoding request's last ([] for none): speculative decoding."""


class Scheduler:
    """Owns the live requests and the block pool; `stop_check` decides when a request is done."""

    def __init__(self, config: SchedulerConfig, stop_check: StopCheck, block_offset: int = 0,
                 drafter: Drafter | None = None):
        """`block_offset`: where this scheduler's blocks start in the KV cache (several share one, see Lanes);
        `drafter`: guesses for decoding requests to check in their step."""
        self.config = config
        self.stop_check = stop_check
        self.drafter = drafter
        self.block_offset = block_offset
        self.pool = BlockPool(config.num_blocks, config.block_size)
        self.requests: dict[str, Request] = {}  # live ones: waiting or running
        self.waiting: deque[Request] = deque()  # arrival order; preempted requests go back to the front
        self.running: list[Request] = []  # kept in arrival order
        self.num_preemptions = 0
        self._num_arrivals = 0
        self._finished_ids: list[str] = []

    def add(self, request: Request, after: str | None = None) -> None:
        """Queue a new request; QueueFull if `max_waiting` are already waiting. `after`: a live request with
        the same prompt; this one waits for its prompt to be computed, then shares its cached blocks."""
        if request.request_id in self.requests:
            raise ValueError(f"request {request.request_id!r} is already queued")
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting; try again shortly")
        if request.num_tokens > self.config.max_tokens_per_request:
            raise PromptTooLong(
                f"the prompt has {request.num_tokens} tokens; the KV cache holds {self.config.max_tokens_per_request}"
            )
        self._num_arrivals += 1
        request.arrival, request.status = self._num_arrivals, RequestStatus.WAITING
        request.after = after
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def cancel(self, request_id: str) -> bool:
        """End a live request now and free its blocks; False if it is unknown or already finished."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        if request in self.waiting:
            self.waiting.remove(request)
        self._finish(request, RequestStatus.FINISHED_CANCELLED)
        return True

    # --- one step -------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens: running requests first, then waiting ones, each in arrival order."""
        step = _Step(self.config.max_num_batched_tokens, self.block_offset)
        running = list(self.running)  # arrival order
        for i, request in enumerate(running):
            if step.budget == 0:
                break
            if request.status == RequestStatus.RUNNING:  # not preempted earlier in this loop
                self._schedule_running(request, step, later=len(running) - i - 1)
        if not step.preempted:  # blocks just ran short: admitting more would only preempt again
            self._schedule_waiting(step)
        finished, self._finished_ids = tuple(self._finished_ids), []
        return SchedulerOutput(tuple(step.scheduled), tuple(r.request_id for r in step.preempted), finished)

    def _schedule_running(self, request: Request, step: _Step, later: int) -> None:
        """`later`: running requests after this one, whose next tokens come before this one's guesses."""
        num_new = min(request.num_tokens - request.num_computed_tokens, step.budget)
        draft = self._draft(request, step.budget - later) if num_new == 1 else ()
        if draft and self.pool.allocate_for(request, 1 + len(draft)):
            step.add(request, 1, draft)
            return
        while not self.pool.allocate_for(request, num_new):  # guesses are never worth preempting anyone
            victim = self.running[-1]  # the latest arrival; the ones before `request` are already scheduled
            self._preempt(victim)
            step.preempted.append(victim)
            if victim is request:
                return
        step.add(request, num_new)

    def _draft(self, request: Request, budget: int) -> tuple[int, ...]:
        if self.drafter is None or budget < 2:
            return ()
        room = min(budget, self.config.max_tokens_per_request - request.num_tokens) - 1
        return tuple(self.drafter(request))[: max(0, room)]

    def _schedule_waiting(self, step: _Step) -> None:
        while self.waiting and step.budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if self._prompt_pending(request):
                return  # its twin is computing the prompt: next step those blocks are cached
            cached = self.pool.cached_prefix(request) if request.cache_prefix else []
            num_new = min(request.num_tokens - len(cached) * self.config.block_size, step.budget)
            if not self.pool.allocate_for(request, num_new, cached):
                return  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)  # it arrived after every running request: they were admitted first
            step.add(request, num_new)

    def _prompt_pending(self, request: Request) -> bool:
        leader = self.requests.get(request.after) if request.after else None
        return leader is not None and leader.num_computed_tokens < leader.num_prompt_tokens

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.pool.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)  # victims go latest-arrived first, so the front stays in order
        self.num_preemptions += 1

    def update(self, output: SchedulerOutput, sampled: Mapping[str, Sequence[int]]) -> list[tuple[Request, int]]:
        """Record a step's results: the computed tokens, and the tokens sampled for each request that sampled
        (one, or with a draft the guesses it kept and the token after them).

        Returns the requests that got tokens, each with how many it kept (finished ones included: see their
        status; a request that ends keeps none past its end)."""
        advanced = []
        for s in output.scheduled:
            request = self.requests.get(s.request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # cancelled while the step ran
            tokens = sampled[s.request_id] if s.sample else ()
            kept = len(tokens) - 1  # guesses confirmed: their keys and values are right
            if s.draft and (not 0 <= kept <= len(s.draft) or tuple(tokens[:kept]) != s.draft[:kept]):
                raise ValueError(f"request {s.request_id!r}: sampled {list(tokens)} do not follow the draft {list(s.draft)}")
            request.num_computed_tokens += len(s.token_ids) - len(s.draft) + max(kept, 0)
            if s.draft:
                self.pool.trim(request)
            self.pool.cache_full_blocks(request)
            if s.sample:
                advanced.append((request, self._append(request, tokens)))
        return advanced

    def _append(self, request: Request, tokens: Sequence[int]) -> int:
        """Append tokens one by one until the request ends; how many it took."""
        for count, token in enumerate(tokens, start=1):
            request.append_output(token)
            self._check_stop(request)
            if request.status.finished:
                return count
        return len(tokens)

    def _check_stop(self, request: Request) -> None:
        status = self.stop_check(request)
        if status is None and request.num_tokens > self.config.max_tokens_per_request:
            status = RequestStatus.FINISHED_LENGTH  # no room in the pool for another token
        if status is not None:
            self._finish(request, status)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        self.pool.free(request)
        request.status = status
        del self.requests[request.request_id]
        self._finished_ids.append(request.request_id)


class _Step:
    """What one schedule() call has handed out so far."""

    def __init__(self, budget: int, block_offset: int = 0):
        self.budget, self.block_offset = budget, block_offset
        self.scheduled: list[ScheduledRequest] = []
        self.preempted: list[Request] = []

    def add(self, request: Request, num_new: int, draft: tuple[int, ...] = ()) -> None:
        start = request.num_computed_tokens
        self.scheduled.append(
            ScheduledRequest(
                request.request_id,
                tuple(request.all_token_ids[start : start + num_new]) + draft,
                start,
                tuple(b + self.block_offset for b in request.block_ids),
                start + num_new == request.num_tokens,
                request.params,
                draft,
            )
        )
        self.budget -= num_new + len(draft)
