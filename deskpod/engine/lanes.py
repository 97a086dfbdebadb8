"""Lanes: the requests split into groups whose batches are in flight at once, so that the boxes of a pipeline
all work — while the last box runs one lane's batch, the first runs the next lane's (vLLM's virtual engines).

Each lane is a Scheduler of its own with its share of the KV pool (its blocks at an offset in the one cache),
so a lane's requests are never scheduled while its last batch is still in flight, and the lanes never take
each other's blocks. A request stays in the lane it was added to (the emptiest); `n` copies of a prompt join
the lane of the request they share the prompt with. To the engine, Lanes looks like one Scheduler.
"""

from __future__ import annotations

import math
from collections import ChainMap
from dataclasses import replace

from deskpod.engine.request import Request
from deskpod.engine.scheduler import Drafter, Scheduler, SchedulerConfig, SchedulerOutput, StopCheck


class Lanes:
    def __init__(self, config: SchedulerConfig, stop_check: StopCheck, count: int, drafter: Drafter | None = None):
        per_lane = replace(config, num_blocks=config.num_blocks // count,
                           max_num_seqs=math.ceil(config.max_num_seqs / count),
                           max_num_batched_tokens=math.ceil(config.max_num_batched_tokens / count),
                           max_waiting=math.ceil(config.max_waiting / count))
        self.config = config
        self.lanes = [Scheduler(per_lane, stop_check, i * per_lane.num_blocks, drafter) for i in range(count)]
        self._lane_of: dict[str, int] = {}
        self.pool = _Pools(self.lanes)

    @property
    def count(self) -> int:
        return len(self.lanes)

    def add(self, request: Request, after: str | None = None) -> None:
        lane = self._lane_of.get(after) if after in self.requests else None
        if lane is None:
            lane = min(range(self.count), key=lambda i: len(self.lanes[i].requests))
        self.lanes[lane].add(request, after)
        if len(self._lane_of) > 4 * len(self.requests) + 64:  # forget the requests that ended
            self._lane_of = {rid: i for rid, i in self._lane_of.items() if rid in self.requests}
        self._lane_of[request.request_id] = lane

    def cancel(self, request_id: str) -> bool:
        lane = self._lane_of.pop(request_id, None)
        return lane is not None and self.lanes[lane].cancel(request_id)

    def has_work(self, lane: int | None = None) -> bool:
        return any(s.has_work() for s in self.lanes) if lane is None else self.lanes[lane].has_work()

    def schedule(self, lane: int) -> SchedulerOutput:
        return self.lanes[lane].schedule()

    @property
    def requests(self) -> ChainMap:
        return ChainMap(*(s.requests for s in self.lanes))

    @property
    def running(self) -> list[Request]:
        return [r for s in self.lanes for r in s.running]

    @property
    def waiting(self) -> list[Request]:
        return [r for s in self.lanes for r in s.waiting]

    @property
    def num_preemptions(self) -> int:
        return sum(s.num_preemptions for s in self.lanes)


class _Pools:
    """The lanes' block pools seen as one, for stats and for dropping the prefix cache."""

    def __init__(self, lanes: list[Scheduler]):
        self._pools = [s.pool for s in lanes]

    @property
    def num_free(self) -> int:
        return sum(p.num_free for p in self._pools)

    @property
    def usage(self) -> float:
        return 1 - self.num_free / sum(p.num_blocks for p in self._pools)

    def forget_cached(self) -> None:
        for pool in self._pools:
            pool.forget_cached()
