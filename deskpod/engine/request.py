"""One generation request as the scheduler sees it: token ids and how many of them are in the KV cache.

One invariant instead of modes (as in vLLM v1): every step computes the tokens from
`num_computed_tokens` up to `num_tokens`, at most a chunk budget of them. A fresh prompt (prefill), the
rest of a long prompt (chunked prefill), the last sampled token (decode), a request resuming after
preemption (everything again) and a prefix-cache hit (start past the cached blocks) are all that rule.
"""

from __future__ import annotations

import enum
from typing import Any


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue, its KV blocks given up; output kept
    FINISHED_STOPPED = "stop"  # an end-of-sequence token or stop condition
    FINISHED_LENGTH = "length"  # max_tokens, or no room left in the KV pool's context
    FINISHED_CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_CANCELLED})


class Request:
    """A prompt, the tokens sampled after it, and the scheduler's state for it.

    `params` is opaque here (the runner's sampling parameters); `arrival` orders requests (first come,
    first served; the latest arrival is preempted first) and is set by `Scheduler.add`."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: Any = None):
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r}: the prompt has no tokens")
        self.request_id = request_id
        self.prompt_token_ids = tuple(prompt_token_ids)
        self.params = params
        self.output_token_ids: list[int] = []
        self.status = RequestStatus.WAITING
        self.arrival = 0
        self.num_computed_tokens = 0  # tokens whose keys and values are in the KV cache
        self.block_ids: list[int] = []  # the block table: block i holds positions [i*bs, (i+1)*bs)
        self.block_hashes: list[bytes] = []  # chained hashes of the full blocks, filled by BlockPool
        self.cache_prefix = True  # may start from cached blocks (not when every prompt token's logits are wanted)
        self.after: str | None = None  # the request with the same prompt this one waits for (Scheduler.add)
        self._all_token_ids = list(prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then output, one list kept up to date (read it, do not change it)."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_ids})"
        )
