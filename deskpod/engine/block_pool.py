"""The paged KV cache's bookkeeping: fixed-size blocks, a free list, reference counts and a prefix cache.

Integers only; the runner owns the tensors. A request's block table (`request.block_ids`) maps its
positions to blocks: position p lives in block `block_ids[p // block_size]` at offset `p % block_size`.

Prefix caching: once a block is full and computed, it is named by a hash chained over everything
before it (the parent block's hash and the block's own token ids), so equal hashes mean equal prefixes.
A new request reuses the blocks of its longest cached prefix (reference count + 1) instead of computing
them again. A freed block keeps its hash and stays in the cache while it waits in the free list; it is
evicted, least recently freed first, only when its memory is handed out again.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from deskpod.engine.request import Request


def hash_block(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The chained hash of a full block: its parent's hash (b"" for the first block) and its token ids."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


class BlockPool:
    """`num_blocks` blocks of `block_size` tokens each, shared by all requests."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a block pool needs at least one block of one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks  # how many live requests hold each block
        self.hashes: list[bytes | None] = [None] * num_blocks  # set once a block is full and computed
        # Blocks with no holder that have held tokens before, in the order they are handed out: uncached
        # first, then cached ones least recently freed first. Dict order makes removing a cache hit from
        # the middle O(1). Blocks never used yet come after all of them: the cache's memory is allocated
        # lazily, so reusing touched blocks first keeps the resident memory at the peak demand instead
        # of letting the prefix cache spread over the whole pool.
        self._free: OrderedDict[int, None] = OrderedDict()
        self._next_untouched = 0  # blocks [_next_untouched, num_blocks) have never been handed out
        self._cached: dict[bytes, int] = {}  # hash -> block holding that prefix
        self._num_hashed: dict[str, int] = {}  # request id -> how many of its leading blocks are hashed

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now, cached ones included (they are evicted on the way)."""
        return len(self._free) + self.num_blocks - self._next_untouched

    @property
    def usage(self) -> float:
        """The fraction of blocks held by live requests, 0..1."""
        return 1 - self.num_free / self.num_blocks

    @property
    def num_cached(self) -> int:
        """Blocks findable by hash, held or free."""
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- prefix cache ---------------------------------------------------------------------------

    def cached_prefix(self, request: Request) -> list[int]:
        """The blocks holding the longest cached run of `request`'s leading full blocks; a lookup only.

        It never covers the whole request: its last token is always left to compute, for its logits."""
        num_candidates = (request.num_tokens - 1) // self.block_size
        blocks = []
        for block_hash in self._block_hashes(request, num_candidates):
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            blocks.append(block_id)
        return blocks

    def cache_full_blocks(self, request: Request) -> None:
        """Hash the blocks that `request.num_computed_tokens` has filled since the last call."""
        num_full = request.num_computed_tokens // self.block_size
        start = self._num_hashed.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request, num_full)
        for block_id, block_hash in zip(request.block_ids[start:num_full], hashes[start:num_full]):
            self.hashes[block_id] = block_hash
            self._cached.setdefault(block_hash, block_id)  # a twin computed at the same time stays unnamed
        self._num_hashed[request.request_id] = num_full

    def _block_hashes(self, request: Request, count: int) -> list[bytes]:
        """The request's first `count` block hashes, computed once and kept on the request."""
        hashes, tokens, size = request.block_hashes, request.all_token_ids, self.block_size
        while len(hashes) < count:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else b"", tokens[i * size : (i + 1) * size]))
        return hashes[:count]

    # --- allocation -----------------------------------------------------------------------------

    def allocate_for(self, request: Request, num_new_tokens: int, cached: Sequence[int] = ()) -> bool:
        """Give `request` room for `num_new_tokens` more tokens; False, changing nothing, if the pool is short.

        `cached` (from `cached_prefix`, for a request holding no blocks yet) is taken first: those blocks
        are shared, and the request's `num_computed_tokens` moves past them."""
        if cached and request.block_ids:
            raise ValueError(f"request {request.request_id!r} already holds blocks; only a new one can reuse a prefix")
        num_cached_tokens = len(cached) * self.block_size
        num_tokens = request.num_computed_tokens + num_cached_tokens + num_new_tokens
        num_new_blocks = max(0, self.blocks_for(num_tokens) - len(cached) - len(request.block_ids))
        num_revived = sum(1 for block_id in cached if self.ref_counts[block_id] == 0)  # leave the free list
        if num_new_blocks + num_revived > self.num_free:
            return False
        for block_id in cached:
            self._hold(block_id)
        if cached:
            request.num_computed_tokens += num_cached_tokens
            self._num_hashed[request.request_id] = len(cached)
        request.block_ids.extend(cached)
        request.block_ids.extend(self._take_free() for _ in range(num_new_blocks))
        return True

    def trim(self, request: Request) -> None:
        """Give back the blocks past `request.num_computed_tokens`: they held only guesses the model rejected
        (speculative decoding), and the next step asks for what it needs."""
        keep = self.blocks_for(request.num_computed_tokens)
        for block_id in reversed(request.block_ids[keep:]):
            self._release(block_id)
        del request.block_ids[keep:]

    def free(self, request: Request) -> None:
        """Give back all of `request`'s blocks; those it was the last to hold join the free list."""
        for block_id in reversed(request.block_ids):  # tail first: a prompt's head is likelier to be shared
            self._release(block_id)
        request.block_ids.clear()
        self._num_hashed.pop(request.request_id, None)

    def _release(self, block_id: int) -> None:
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] == 0:
            self._free[block_id] = None
            if not self._is_cached(block_id):
                self._free.move_to_end(block_id, last=False)  # nothing to keep: hand it out first

    def forget_cached(self) -> None:
        """Drop the prefix cache: the blocks' contents can no longer be trusted (a linked box that held part of
        them went away)."""
        self._cached.clear()
        self.hashes = [None] * self.num_blocks

    def _hold(self, block_id: int) -> None:
        if self.ref_counts[block_id] == 0:
            del self._free[block_id]
        self.ref_counts[block_id] += 1

    def _take_free(self) -> int:
        if not self._free:
            self._next_untouched += 1
            self.ref_counts[self._next_untouched - 1] = 1
            return self._next_untouched - 1
        block_id, _ = self._free.popitem(last=False)
        block_hash = self.hashes[block_id]
        if block_hash is not None:  # evict: its memory is about to hold other tokens
            if self._cached.get(block_hash) == block_id:
                del self._cached[block_hash]
            self.hashes[block_id] = None
        self.ref_counts[block_id] = 1
        return block_id

    def _is_cached(self, block_id: int) -> bool:
        block_hash = self.hashes[block_id]
        return block_hash is not None and self._cached.get(block_hash) == block_id
