"""Scheduler, driven by a fake model that reads its input back through the paged KV cache.

The fake runner writes every computed token into a slot table indexed by the block tables it is given,
and samples next = f(the tokens it reads back through the block table). A wrong block table, a block
shared that should not be, or a cached block overwritten changes the output, so comparing each
request's output with f run on its own catches them all."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from deskpod.engine.request import Request, RequestStatus
from deskpod.engine.scheduler import QueueFull, Scheduler, SchedulerConfig, SchedulerOutput
from deskpod.errors import DeskpodError, PromptTooLong

EOS = 1


def next_token(tokens: list[int]) -> int:
    """The fake model: deterministic in all the tokens so far; EOS now and then."""
    return sum((i + 1) * t for i, t in enumerate(tokens)) % 61 + 1


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    """What one request generates alone, never batched, never preempted."""
    tokens, output = list(prompt), []
    while len(output) < max_tokens:
        output.append(next_token(tokens))
        tokens.append(output[-1])
        if output[-1] == EOS:
            break
    return output


@dataclass(frozen=True)
class Params:
    max_tokens: int


def stop_check(request: Request) -> RequestStatus | None:
    if request.output_token_ids[-1] == EOS:
        return RequestStatus.FINISHED_STOPPED
    if len(request.output_token_ids) >= request.params.max_tokens:
        return RequestStatus.FINISHED_LENGTH
    return None


class FakeRunner:
    """A paged 'KV cache' of token ids: slots[block][offset]."""

    def __init__(self, config: SchedulerConfig):
        self.block_size = config.block_size
        self.slots: list[list[int | None]] = [[None] * config.block_size for _ in range(config.num_blocks)]

    def execute(self, out: SchedulerOutput) -> dict[str, list[int]]:
        for s in out.scheduled:  # write every request's keys and values first, as a forward pass does
            for position, token in enumerate(s.token_ids, start=s.start):
                self.slots[s.block_table[position // self.block_size]][position % self.block_size] = token
        return {s.request_id: self.sample(s) for s in out.scheduled if s.sample}

    def sample(self, s) -> list[int]:
        """The token after the chunk, or with a draft each row's in turn while it agrees with the draft."""
        first_row = s.start + len(s.token_ids) - len(s.draft)
        tokens = []
        for j in range(len(s.draft) + 1):
            tokens.append(next_token(self.read(s.block_table, first_row + j)))
            if j == len(s.draft) or tokens[-1] != s.draft[j]:
                break
        return tokens

    def read(self, block_table: tuple[int, ...], num_tokens: int) -> list[int]:
        tokens = [self.slots[block_table[p // self.block_size]][p % self.block_size] for p in range(num_tokens)]
        assert None not in tokens, "attention read a slot that was never written"
        return tokens  # type: ignore[return-value]


def make_scheduler(drafter=None, **config) -> tuple[Scheduler, FakeRunner]:
    defaults = {"max_num_seqs": 8, "max_num_batched_tokens": 64, "block_size": 4, "num_blocks": 64}
    cfg = SchedulerConfig(**{**defaults, **config})
    return Scheduler(cfg, stop_check, drafter=drafter), FakeRunner(cfg)


def request(request_id: str, prompt: list[int], max_tokens: int = 8) -> Request:
    return Request(request_id, prompt, Params(max_tokens))


def step(scheduler: Scheduler, runner: FakeRunner) -> SchedulerOutput:
    out = scheduler.schedule()
    scheduler.update(out, runner.execute(out))
    check_invariants(scheduler, out)
    return out


def run_to_end(scheduler: Scheduler, runner: FakeRunner, max_steps: int = 1000) -> list[SchedulerOutput]:
    outputs = []
    while scheduler.has_work():
        outputs.append(step(scheduler, runner))
        assert len(outputs) < max_steps, "the scheduler stopped making progress"
    return outputs


def prompt_of(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, 60) for _ in range(length)]


def check_invariants(scheduler: Scheduler, out: SchedulerOutput) -> None:
    pool, config = scheduler.pool, scheduler.config
    assert out.num_tokens <= config.max_num_batched_tokens
    assert len({s.request_id for s in out.scheduled}) == len(out.scheduled)
    assert len(scheduler.running) <= config.max_num_seqs
    assert set(scheduler.requests) == {r.request_id for r in [*scheduler.waiting, *scheduler.running]}
    assert not set(out.preempted_ids) & {s.request_id for s in out.scheduled}
    # First come, first served: the running requests arrived before the waiting ones, each in order,
    # and only the latest running one can be in the middle of its prefill (or of its recomputation).
    order = [r.arrival for r in [*scheduler.running, *scheduler.waiting]]
    assert order == sorted(order)
    assert all(r.num_tokens - r.num_computed_tokens == 1 for r in scheduler.running[:-1])
    for r in scheduler.waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert r.block_ids == [] and r.num_computed_tokens == 0
    holders: dict[int, list[tuple[Request, int]]] = {}
    for r in scheduler.running:
        assert r.status == RequestStatus.RUNNING
        assert 0 < r.num_computed_tokens < r.num_tokens  # something computed, the last sampled token not yet
        assert len(r.block_ids) == pool.blocks_for(r.num_computed_tokens)
        for index, block_id in enumerate(r.block_ids):
            holders.setdefault(block_id, []).append((r, index))
    for block_id in range(config.num_blocks):
        owners = holders.get(block_id, [])
        assert pool.ref_counts[block_id] == len(owners)
        if len(owners) > 1:  # shared only through the prefix cache, by requests with that very prefix
            assert pool.hashes[block_id] is not None
            assert all(r.block_hashes[index] == pool.hashes[block_id] for r, index in owners)
    assert pool.num_free + sum(1 for count in pool.ref_counts if count > 0) == config.num_blocks


# --- continuous batching and chunked prefill ------------------------------------------------------


def test_a_request_added_while_others_decode_joins_the_next_step():
    scheduler, runner = make_scheduler()
    scheduler.add(request("a", prompt_of(6, 0), max_tokens=10))
    first = step(scheduler, runner)
    assert [(s.request_id, s.start, len(s.token_ids), s.sample) for s in first.scheduled] == [("a", 0, 6, True)]
    step(scheduler, runner)
    scheduler.add(request("b", prompt_of(5, 1), max_tokens=10))
    joined = step(scheduler, runner)
    assert [(s.request_id, s.start, len(s.token_ids)) for s in joined.scheduled] == [("a", 7, 1), ("b", 0, 5)]
    run_to_end(scheduler, runner)


def test_a_long_prompt_is_chunked_within_the_budget_while_running_requests_keep_decoding():
    scheduler, runner = make_scheduler(max_num_batched_tokens=8, max_num_seqs=4)
    short, long = request("short", prompt_of(3, 0), max_tokens=12), request("long", prompt_of(30, 1), max_tokens=3)
    scheduler.add(short)
    step(scheduler, runner)
    scheduler.add(long)
    chunks = []
    while long.num_computed_tokens < long.num_prompt_tokens:
        out = step(scheduler, runner)
        by_id = {s.request_id: s for s in out.scheduled}
        assert (by_id["short"].start, len(by_id["short"].token_ids)) == (short.num_tokens - 2, 1)  # decoded
        chunk = by_id["long"]
        chunks.append((chunk.start, len(chunk.token_ids), chunk.sample))
    assert chunks == [(0, 7, False), (7, 7, False), (14, 7, False), (21, 7, False), (28, 2, True)]
    assert len(long.output_token_ids) == 1
    run_to_end(scheduler, runner)
    assert short.output_token_ids == reference(list(short.prompt_token_ids), 12)
    assert long.output_token_ids == reference(list(long.prompt_token_ids), 3)


def test_several_new_prompts_share_one_step_and_the_last_one_is_chunked():
    scheduler, runner = make_scheduler(max_num_batched_tokens=16, max_num_seqs=4)
    for name, seed in (("a", 0), ("b", 1), ("c", 2)):
        scheduler.add(request(name, prompt_of(7, seed)))
    out = step(scheduler, runner)
    chunks = [(s.request_id, len(s.token_ids), s.sample) for s in out.scheduled]
    assert chunks == [("a", 7, True), ("b", 7, True), ("c", 2, False)]
    run_to_end(scheduler, runner)


# --- prefix caching -----------------------------------------------------------------------------


def test_a_shared_system_prompt_is_computed_once():
    scheduler, runner = make_scheduler(block_size=4)
    pool = scheduler.pool
    system = prompt_of(12, 7)  # 3 full blocks
    first, second = request("first", system + [5, 6], 6), request("second", system + [9, 8, 7], 6)
    scheduler.add(first)
    step(scheduler, runner)
    scheduler.add(second)
    out = step(scheduler, runner)
    scheduled = {s.request_id: s for s in out.scheduled}["second"]
    assert (scheduled.start, scheduled.token_ids) == (12, (9, 8, 7))  # only the remainder
    shared = first.block_ids[:3]
    assert second.block_ids[:3] == shared and second.block_ids[3] not in first.block_ids
    assert [pool.ref_counts[b] for b in shared] == [2, 2, 2]
    run_to_end(scheduler, runner)
    assert first.output_token_ids == reference(system + [5, 6], 6)
    assert second.output_token_ids == reference(system + [9, 8, 7], 6)
    assert pool.usage == 0 and pool.num_free == scheduler.config.num_blocks
    assert all(pool.ref_counts[b] == 0 for b in shared)

    third = request("third", system + [4], 2)  # after both finished: the blocks are still cached
    scheduler.add(third)
    out = step(scheduler, runner)
    assert out.scheduled[0].start == 12 and third.block_ids[:3] == shared
    assert [pool.ref_counts[b] for b in shared] == [1, 1, 1]
    run_to_end(scheduler, runner)
    assert third.output_token_ids == reference(system + [4], 2) and pool.usage == 0


def test_a_prompt_cached_whole_still_computes_its_last_token():
    scheduler, runner = make_scheduler(block_size=4)
    prompt = prompt_of(8, 3)
    scheduler.add(request("a", prompt, 1))
    run_to_end(scheduler, runner)
    scheduler.add(request("b", prompt, 3))
    out = step(scheduler, runner)
    assert (out.scheduled[0].start, len(out.scheduled[0].token_ids)) == (4, 4)  # block 2 holds the last token
    run_to_end(scheduler, runner)


# --- preemption ---------------------------------------------------------------------------------


def test_the_latest_arrival_is_preempted_when_blocks_run_out_and_resumes_with_the_same_output():
    scheduler, runner = make_scheduler(block_size=4, num_blocks=10, max_num_seqs=4, max_num_batched_tokens=64)
    prompts = {name: prompt_of(6, seed) for seed, name in enumerate("abc")}
    requests = {name: request(name, prompt, max_tokens=20) for name, prompt in prompts.items()}
    for r in requests.values():
        scheduler.add(r)
    outputs = run_to_end(scheduler, runner)
    preempted = [i for out in outputs for i in out.preempted_ids]
    assert scheduler.num_preemptions == len(preempted) > 0
    assert preempted[0] == "c"  # the latest arrival goes first
    for name, r in requests.items():
        assert r.output_token_ids == reference(prompts[name], 20), name
        assert r.status.finished and r.block_ids == []
    assert scheduler.pool.usage == 0


def test_a_preempted_request_leaves_the_step_and_comes_back_to_the_front_of_the_queue():
    scheduler, runner = make_scheduler(block_size=4, num_blocks=3, max_num_seqs=4, max_num_batched_tokens=16)
    a, b = request("a", prompt_of(4, 0), 8), request("b", prompt_of(4, 1), 8)
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler, runner)  # each holds one block, and each needs a second one to decode
    scheduler.add(request("late", prompt_of(3, 2), 1))
    out = step(scheduler, runner)
    assert out.preempted_ids == ("b",) and [s.request_id for s in out.scheduled] == ["a"]  # no admission either
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and len(b.output_token_ids) == 1
    assert [r.request_id for r in scheduler.waiting] == ["b", "late"]
    run_to_end(scheduler, runner)
    assert b.output_token_ids == reference(list(b.prompt_token_ids), 8)


def test_a_request_that_outgrows_the_whole_pool_stops_at_its_length():
    scheduler, runner = make_scheduler(block_size=4, num_blocks=3)
    alone = request("alone", prompt_of(5, 4), max_tokens=100)
    scheduler.add(alone)
    run_to_end(scheduler, runner)
    assert alone.status == RequestStatus.FINISHED_LENGTH  # the pool holds 12 tokens: 7 computed outputs + 1
    assert alone.output_token_ids == reference(list(alone.prompt_token_ids), 8)


# --- cancellation, admission limits -------------------------------------------------------------


def test_cancel_frees_blocks_at_once_and_is_reported_to_the_runner():
    scheduler, runner = make_scheduler()
    baseline = scheduler.pool.num_free
    running, waiting = request("running", prompt_of(9, 0), 50), request("waiting", prompt_of(5, 1))
    scheduler.add(running)
    step(scheduler, runner)
    scheduler.add(waiting)
    assert scheduler.pool.num_free < baseline
    assert scheduler.cancel("running") and scheduler.cancel("waiting")
    assert scheduler.pool.num_free == baseline and scheduler.pool.usage == 0
    assert running.status == waiting.status == RequestStatus.FINISHED_CANCELLED and running.block_ids == []
    assert not scheduler.cancel("running") and not scheduler.cancel("never-seen")
    assert not scheduler.has_work()
    assert set(scheduler.schedule().finished_ids) == {"running", "waiting"}


def test_a_request_cancelled_while_its_step_runs_is_ignored_by_update():
    scheduler, runner = make_scheduler()
    scheduler.add(request("a", prompt_of(5, 0)))
    scheduler.add(request("b", prompt_of(5, 1)))
    out = scheduler.schedule()
    sampled = runner.execute(out)
    scheduler.cancel("a")
    assert [(r.request_id, count) for r, count in scheduler.update(out, sampled)] == [("b", 1)]
    check_invariants(scheduler, out)
    run_to_end(scheduler, runner)


def test_a_full_waiting_queue_raises_queue_full():
    scheduler, runner = make_scheduler(max_waiting=2)
    scheduler.add(request("a", [2, 3]))
    scheduler.add(request("b", [2, 3]))
    with pytest.raises(QueueFull) as raised:
        scheduler.add(request("c", [2, 3]))
    assert isinstance(raised.value, DeskpodError)
    step(scheduler, runner)  # both admitted: the queue has room again
    scheduler.add(request("c", [2, 3]))
    run_to_end(scheduler, runner)


def test_a_prompt_larger_than_the_pool_is_refused_and_duplicates_are_an_error():
    scheduler, _ = make_scheduler(block_size=4, num_blocks=2)
    with pytest.raises(PromptTooLong):
        scheduler.add(request("huge", list(range(2, 11))))
    scheduler.add(request("a", [2, 3]))
    with pytest.raises(ValueError):
        scheduler.add(request("a", [2, 3]))


BAD_CONFIGS = [
    {"max_num_seqs": 0}, {"block_size": 0}, {"num_blocks": 0}, {"max_waiting": 0}, {"max_num_batched_tokens": 4}
]


@pytest.mark.parametrize("bad", BAD_CONFIGS)
def test_config_is_checked_at_construction(bad):
    with pytest.raises(ValueError):
        SchedulerConfig(**{"max_num_seqs": 8, **bad})  # 4 batched tokens cannot decode 8 requests


# --- everything at once -------------------------------------------------------------------------


def test_guesses_never_take_a_later_request_s_turn():
    """Guesses use the step's budget left after one token for each running request: with a budget of exactly
    one token per sequence, nobody guesses and everyone decodes every step."""
    scheduler, runner = make_scheduler(lambda r: [2, 3, 4, 5, 6], max_num_seqs=3, max_num_batched_tokens=3)
    for name, seed in (("a", 0), ("b", 1), ("c", 2)):
        scheduler.add(request(name, prompt_of(1, seed), max_tokens=20))
    step(scheduler, runner)  # the three one-token prompts
    for _ in range(5):
        out = step(scheduler, runner)
        assert [(s.request_id, s.draft) for s in out.scheduled] == [("a", ()), ("b", ()), ("c", ())]
    scheduler.cancel("b")
    out = step(scheduler, runner)  # a budget of 3 for two requests: the first guesses one token
    assert [(s.request_id, s.draft) for s in out.scheduled] == [("a", (2,)), ("c", ())]


class GuessingDrafter:
    """Speculative decoding's guesses, right for a random number of tokens and then wrong (the fake model is
    known, so the right ones can be made)."""

    def __init__(self, rng: random.Random):
        self.rng, self.drafted, self.accepted = rng, 0, 0

    def __call__(self, r: Request) -> list[int]:
        tokens, guesses = list(r.all_token_ids), []
        right = self.rng.choice([0, 0, 1, 2, 3, 5])
        for _ in range(self.rng.choice([0, 1, 3, 6])):
            guess = next_token(tokens) if len(guesses) < right else self.rng.randrange(2, 60)
            guesses.append(guess)
            tokens.append(guess)
        return guesses


@pytest.mark.parametrize("seed,speculative", [(0, False), (1, False), (2, False), (3, True), (4, True), (5, True)])
def test_random_traffic_keeps_the_invariants_and_every_output_exact(seed, speculative):
    """With speculative decoding too: rejected guesses leave keys and values the model must never read."""
    rng = random.Random(seed)
    drafter = GuessingDrafter(random.Random(seed)) if speculative else None
    scheduler, runner = make_scheduler(drafter, num_blocks=40, max_num_seqs=6, max_num_batched_tokens=24, max_waiting=8)
    kept = drafted = 0
    systems = [prompt_of(rng.choice([4, 8, 12]), 100 + i) for i in range(3)]  # shared prompt heads
    requests: dict[str, tuple[Request, list[int]]] = {}
    cache_hits = rejected = 0
    started: set[str] = set()
    for step_number in range(200):
        if rng.random() < (0.6 if speculative else 0.4):  # guesses drain the queue faster: keep it full
            prompt = (rng.choice(systems) if rng.random() < 0.6 else []) + prompt_of(rng.randint(1, 30), rng.random())
            r = request(f"r{step_number}", prompt, max_tokens=rng.randint(1, 40))
            try:
                scheduler.add(r)
                requests[r.request_id] = (r, prompt)
            except QueueFull:
                rejected += 1
        live = list(scheduler.requests)
        if live and rng.random() < 0.05:
            assert scheduler.cancel(rng.choice(live))
        out = scheduler.schedule()
        sampled = runner.execute(out)
        if live and rng.random() < 0.03:  # a client goes away while the step runs
            scheduler.cancel(rng.choice(list(scheduler.requests) or live))
        scheduler.update(out, sampled)
        check_invariants(scheduler, out)
        drafted += sum(len(s.draft) for s in out.scheduled)
        kept += sum(len(sampled[s.request_id]) - 1 for s in out.scheduled if s.draft)
        for s in out.scheduled:  # a request's first chunk (again, after a preemption) starting past 0
            if s.request_id not in started and s.start > 0:
                cache_hits += 1
            started.add(s.request_id)
        started.difference_update(out.preempted_ids)
    run_to_end(scheduler, runner)

    assert scheduler.num_preemptions > 0 and rejected > 0 and cache_hits > 0
    assert (drafted > kept > 0) == speculative  # guesses were made, some kept and some not
    for r, prompt in requests.values():
        assert r.status.finished and r.block_ids == []
        if r.status != RequestStatus.FINISHED_CANCELLED:
            assert r.output_token_ids == reference(prompt, r.params.max_tokens), r.request_id
    assert scheduler.pool.usage == 0 and scheduler.pool.num_free == scheduler.config.num_blocks
