"""BlockPool: allocation, reference counts, the chained-hash prefix cache and its eviction order."""

from __future__ import annotations

from deskpod.engine.block_pool import BlockPool, hash_block
from deskpod.engine.request import Request

BS = 4


def make(tokens: list[int], request_id: str = "r") -> Request:
    return Request(request_id, tokens)


def compute(pool: BlockPool, request: Request, num_tokens: int) -> None:
    """Allocate and 'compute' `num_tokens` more tokens of `request`, as a step of the engine would."""
    assert pool.allocate_for(request, num_tokens)
    request.num_computed_tokens += num_tokens
    pool.cache_full_blocks(request)


def test_allocate_grows_a_block_at_a_time_and_free_returns_everything():
    pool = BlockPool(num_blocks=8, block_size=BS)
    request = make(list(range(10)))
    assert pool.allocate_for(request, 5)  # positions 0..4: two blocks
    assert len(request.block_ids) == 2 and pool.num_free == 6 and pool.usage == 2 / 8
    request.num_computed_tokens = 5
    assert pool.allocate_for(request, 3)  # up to position 7: still two blocks
    assert len(request.block_ids) == 2
    request.num_computed_tokens = 8
    assert pool.allocate_for(request, 1)  # position 8 starts the third
    assert len(request.block_ids) == 3 and pool.ref_counts[request.block_ids[2]] == 1
    pool.free(request)
    assert request.block_ids == [] and pool.num_free == 8 and pool.usage == 0


def test_allocate_refuses_without_changing_anything_when_the_pool_is_short():
    pool = BlockPool(num_blocks=3, block_size=BS)
    first, second = make(list(range(8)), "a"), make(list(range(8)), "b")
    assert pool.allocate_for(first, 8)
    assert not pool.allocate_for(second, 8)  # needs 2, 1 free
    assert second.block_ids == [] and pool.num_free == 1
    assert pool.allocate_for(second, 4)


def test_hashes_chain_over_the_whole_prefix():
    block = [5, 6, 7, 8]
    assert hash_block(b"", block) == hash_block(b"", list(block))
    assert hash_block(b"", block) != hash_block(hash_block(b"", [1, 2, 3, 4]), block)  # same tokens, other prefix
    assert hash_block(b"", block) != hash_block(b"", [5, 6, 7, 9])


def test_a_cached_prefix_is_shared_and_leaves_the_last_token_to_compute():
    pool = BlockPool(num_blocks=16, block_size=BS)
    system = list(range(100, 112))  # 3 full blocks
    first = make(system + [1, 2], "a")
    compute(pool, first, first.num_tokens)
    assert [pool.hashes[b] is not None for b in first.block_ids] == [True, True, True, False]

    second = make(system + [3], "b")
    cached = pool.cached_prefix(second)
    assert cached == first.block_ids[:3]
    assert pool.allocate_for(second, 1, cached)
    assert second.num_computed_tokens == 12 and second.block_ids[:3] == cached and len(second.block_ids) == 4
    assert [pool.ref_counts[b] for b in cached] == [2, 2, 2]
    assert pool.num_free == 16 - 5

    exact = make(system, "c")  # the whole prompt is cached: its last block is computed again
    assert pool.cached_prefix(exact) == cached[:2]

    pool.free(first)
    pool.free(second)
    assert pool.num_free == 16 and pool.usage == 0
    assert pool.cached_prefix(make(system + [9], "d")) == cached  # freed, still cached


def test_reusing_freed_cached_blocks_takes_them_out_of_the_free_list():
    pool = BlockPool(num_blocks=4, block_size=BS)
    system = list(range(8))
    first = make(system + [1], "a")
    compute(pool, first, 9)
    pool.free(first)
    second = make(system + [2, 3, 4, 5, 6], "b")  # 2 cached blocks + 2 new ones: exactly the pool
    cached = pool.cached_prefix(second)
    assert len(cached) == 2
    assert pool.allocate_for(second, 5, cached)
    assert pool.num_free == 0 and sorted(second.block_ids) == [0, 1, 2, 3]
    third = make(system + [7], "c")
    assert not pool.allocate_for(third, 1, pool.cached_prefix(third))  # shares 2 blocks but needs a third


def test_touched_blocks_are_reused_first_uncached_then_least_recently_freed_before_untouched_ones():
    # the runner allocates the cache lazily: reusing blocks that held tokens keeps resident memory at the
    # peak demand, so a cached block is evicted before a never-used block is touched
    pool = BlockPool(num_blocks=6, block_size=BS)
    old = make(list(range(10, 18)) + [0], "old")  # 2 full blocks + 1 partial
    compute(pool, old, 9)
    old_head, old_tail, old_partial = old.block_ids
    assert old.block_ids == [0, 1, 2]
    pool.free(old)
    recent = make(list(range(20, 24)) + [0], "recent")  # 1 full block + 1 partial
    compute(pool, recent, 5)
    # the freed partial block first (nothing to keep), then the least recently freed cached one: the tail
    assert recent.block_ids == [old_partial, old_tail]
    assert pool.cached_prefix(make(list(range(10, 18)) + [1], "x")) == [old_head]  # the head survives
    pool.free(recent)

    taker = make(list(range(40, 56)), "taker")
    assert pool.allocate_for(taker, 16)  # 4 blocks: the 3 touched ones (evicting the cache), then block 3
    assert sorted(taker.block_ids) == [0, 1, 2, 3]
    assert pool.num_cached == 0 and pool.num_free == 2


def test_twins_computed_at_once_are_both_freed_and_one_stays_findable():
    pool = BlockPool(num_blocks=8, block_size=BS)
    a, b = make([1, 2, 3, 4, 5], "a"), make([1, 2, 3, 4, 6], "b")
    assert pool.allocate_for(a, 5) and pool.allocate_for(b, 5)  # admitted in the same step: nothing cached yet
    for request in (a, b):
        request.num_computed_tokens = 5
        pool.cache_full_blocks(request)
    twin_a, twin_b = a.block_ids[0], b.block_ids[0]
    assert twin_a != twin_b and pool.hashes[twin_a] == pool.hashes[twin_b]
    assert pool.num_cached == 1
    pool.free(a)
    pool.free(b)
    assert pool.num_free == 8
    assert pool.cached_prefix(make([1, 2, 3, 4, 7], "c")) == [twin_a]
    taker = make(list(range(32)), "taker")
    assert pool.allocate_for(taker, 32)  # evicts everything, the unnamed twin included
    assert pool.num_cached == 0 and all(h is None for h in pool.hashes)
