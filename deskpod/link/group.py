"""The boxes of a link as a torch.distributed process group (gloo on CPU), and what crosses it each step:
the step's token ids and attention layout from the head to every box, activations along a pipeline, and the
partial sums of tensor parallel.

Tensor parallel sums with a pairwise exchange rather than gloo's allreduce: each box sends its partial to
every other and adds all of them in rank order. On two boxes that is one message each way at once (~60 µs
here against ~500 µs for allreduce's ring), and every box adds the same numbers in the same order, so they
hold bit-identical activations.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from deskpod.engine.attention import AttentionBatch, PrefillChunk
from deskpod.errors import LinkLost

__all__ = ["LinkGroup", "LinkLost", "LinkTimings", "PartialSums"]

IDLE_WAIT = datetime.timedelta(days=365)  # a worker waits this long for the next step: as long as the head lives


@dataclass
class LinkTimings:
    """Seconds spent waiting on the link, for the benchmark and /metrics."""

    exchange: float = 0.0  # tensor parallel partial sums
    handoff: float = 0.0  # pipeline activations sent and received
    steps: int = 0

    def reset(self) -> None:
        self.exchange = self.handoff = 0.0
        self.steps = 0


@dataclass
class LinkGroup:
    pg: dist.ProcessGroup
    rank: int
    world: int
    describe_failure: Callable[[Exception], str] = str  # the head names the box that went away
    timings: LinkTimings = field(default_factory=LinkTimings)

    @classmethod
    def create(cls, store: dist.Store, rank: int, world: int, address: str, timeout: float, **kw) -> LinkGroup:
        """The gloo group, its sockets bound to `address` only."""
        options = dist.ProcessGroupGloo._Options()
        options._timeout = datetime.timedelta(seconds=timeout)
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=address)]
        return cls(dist.ProcessGroupGloo(store, rank, world, options), rank, world, **kw)

    def _wait(self, works, timeout: datetime.timedelta | None = None) -> None:
        try:
            for work in works:
                work.wait(timeout) if timeout else work.wait()
        except RuntimeError as e:
            raise LinkLost(self.describe_failure(e)) from None

    # --- tensor parallel ----------------------------------------------------------------------------

    def exchange_sum(self, partial: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        partial = partial.contiguous()
        others = {r: torch.empty_like(partial) for r in range(self.world) if r != self.rank}
        works = [self.pg.send([partial], r, 1) for r in others] + [self.pg.recv([t], r, 1) for r, t in others.items()]
        self._wait(works)
        parts = [others.get(r, partial) for r in range(self.world)]
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        self.timings.exchange += time.perf_counter() - start
        return total

    # --- pipeline ------------------------------------------------------------------------------------

    def send(self, tensor: torch.Tensor, to: int) -> None:
        start = time.perf_counter()
        self._wait([self.pg.send([tensor.contiguous()], to, 2)])
        self.timings.handoff += time.perf_counter() - start

    def receive(self, shape: tuple[int, ...], dtype: torch.dtype, source: int) -> torch.Tensor:
        start = time.perf_counter()
        out = torch.empty(shape, dtype=dtype)
        self._wait([self.pg.recv([out], source, 2)])
        self.timings.handoff += time.perf_counter() - start
        return out

    # --- the step's inputs ---------------------------------------------------------------------------

    def send_step(self, ids: torch.Tensor, batch: AttentionBatch) -> None:
        """Head: the step's token ids and layout to every other box (two messages each: length, then data)."""
        self.wait(self.post_step(ids, batch))

    def post_step(self, ids: torch.Tensor, batch: AttentionBatch) -> list:
        """send_step without waiting: the messages' works, for wait()."""
        data = encode_step(ids, batch)
        length = torch.tensor([len(data)], dtype=torch.int64)
        self.timings.steps += 1
        # (a send's work holds its tensor until gloo has sent it)
        return [w for r in range(1, self.world) for w in (self.pg.send([length], r, 0), self.pg.send([data], r, 0))]

    def post_send(self, tensor: torch.Tensor, to: int):
        """Start sending activations on; wait() for it later."""
        return self.pg.send([tensor.contiguous()], to, 2)

    def wait(self, works) -> None:
        start = time.perf_counter()
        self._wait(works)
        self.timings.handoff += time.perf_counter() - start

    def receive_step(self) -> tuple[torch.Tensor, AttentionBatch] | None:
        """Worker: the next step from the head, waiting as long as it takes; None when the head ends the link."""
        length = torch.empty(1, dtype=torch.int64)
        self._wait([self.pg.recv([length], 0, 0)], IDLE_WAIT)
        if int(length) == 0:
            return None
        data = torch.empty(int(length), dtype=torch.int64)
        self._wait([self.pg.recv([data], 0, 0)])
        return decode_step(data)

    def send_stop(self) -> None:
        self._wait([self.pg.send([torch.zeros(1, dtype=torch.int64)], r, 0) for r in range(1, self.world)])


# A step as one int64 tensor: [T, B, width, P, R, ids (T), positions (T), slots (T), decode_rows (B),
# decode_block_tables (B × width), decode_context_lens (B), logit_rows (R), then per prefill chunk:
# row_start, row_stop, start, context_len, table length, table]
def encode_step(ids: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
    tables = batch.decode_block_tables
    head = [len(ids), len(batch.decode_rows), tables.shape[1] if tables.dim() == 2 else 0, len(batch.prefills),
            len(batch.logit_rows)]
    parts = [torch.tensor(head), ids, batch.positions, batch.slots, batch.decode_rows, tables.flatten(),
             batch.decode_context_lens, batch.logit_rows]
    for chunk in batch.prefills:
        parts += [torch.tensor([chunk.rows.start, chunk.rows.stop, chunk.start, chunk.context_len,
                                len(chunk.block_table)]), chunk.block_table]
    return torch.cat([p.to(torch.int64).flatten() for p in parts])


def decode_step(data: torch.Tensor) -> tuple[torch.Tensor, AttentionBatch]:
    T, B, width, P, R = data[:5].tolist()
    at = 5

    def take(n: int) -> torch.Tensor:
        nonlocal at
        at += n
        return data[at - n : at]

    ids, positions, slots, decode_rows = take(T), take(T), take(T), take(B)
    tables = take(B * width).view(B, width)
    lens, logit_rows = take(B), take(R)
    chunks = []
    for _ in range(P):
        row_start, row_stop, start, context_len, n = take(5).tolist()
        chunks.append(PrefillChunk(slice(row_start, row_stop), take(n).clone(), start, context_len))
    batch = AttentionBatch(positions.clone(), slots.clone(), decode_rows.clone(), tables.clone(), lens.clone(),
                           tuple(chunks), logit_rows.clone())
    return ids.clone(), batch


class PartialSums:
    """The `reduce` of a tensor-parallel model's blocks: sums over whichever group the box is in now (a box that
    joins again forms a new group; the model stays loaded)."""

    def __init__(self):
        self.group: LinkGroup | None = None

    def __call__(self, partial: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            raise LinkLost("the link is down")
        return self.group.exchange_sum(partial)
