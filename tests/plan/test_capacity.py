import pytest

from deskpod.errors import DeskpodError
from deskpod.plan import capacity
from deskpod.plan.builtins import get_builtin
from deskpod.plan.capacity import DoesNotFit, check_fits, kv_blocks_for, kv_bytes_per_token
from deskpod.plan.shape import InvalidPlanInput

LLAMA_8B = get_builtin("llama-3.1-8b")
GB = 10**9


def test_kv_bytes_per_token_is_two_tensors_per_layer():
    # 2 (K and V) · 32 layers · 8 KV heads · 128 head_dim · 2 bytes
    assert kv_bytes_per_token(LLAMA_8B) == 2 * 32 * 8 * 128 * 2 == 131_072
    assert kv_bytes_per_token(LLAMA_8B, kv_dtype_bytes=1) == 65_536
    assert kv_bytes_per_token(get_builtin("smollm2"), 4) == 2 * 30 * 3 * 64 * 4


def test_check_fits_returns_the_breakdown():
    plan = check_fits(LLAMA_8B, 16 * GB, 8192, 24 * GB, batch=2)
    assert plan.fits and plan.batch == 2
    assert plan.kv_cache == 131_072 * 8192 * 2
    assert plan.total == plan.weights + plan.kv_cache + plan.activations + plan.overhead
    assert 0 < plan.activations < GB


def test_does_not_fit_names_the_parts_and_the_ways_out():
    with pytest.raises(DoesNotFit) as raised:
        check_fits(LLAMA_8B, 16 * GB, 131_072, 24 * GB, batch=1, overhead_bytes=GB)
    err = raised.value
    assert isinstance(err, DeskpodError)
    message = str(err)
    for text in ("weights", "kv cache", "activations", "runtime overhead", "131,072 bytes/token",
                 "a lower precision", "a shorter context: at most", "linking boxes: 2 boxes"):
        assert text in message
    assert err.plan.total > err.plan.available


def test_the_shorter_context_it_offers_does_fit():
    with pytest.raises(DoesNotFit) as raised:
        check_fits(LLAMA_8B, 16 * GB, 131_072, 24 * GB)
    tokens = int(str(raised.value).split("at most ")[1].split(" tokens")[0].replace(",", ""))
    assert check_fits(LLAMA_8B, 16 * GB, tokens, 24 * GB).fits
    with pytest.raises(DoesNotFit):
        check_fits(LLAMA_8B, 16 * GB, tokens + 100, 24 * GB)


def test_max_context_and_max_batch_sit_on_the_edge():
    args = (LLAMA_8B, 16 * GB)
    longest = capacity.max_context(*args, 24 * GB)
    assert capacity.memory_plan(*args, longest, 24 * GB).fits
    assert not capacity.memory_plan(*args, longest + 1, 24 * GB).fits
    assert capacity.max_context(*args, 24 * GB, limit=131_072) == min(longest, 131_072)
    most = capacity.max_batch(*args, 4096, 24 * GB)
    assert capacity.memory_plan(*args, 4096, 24 * GB, most).fits
    assert not capacity.memory_plan(*args, 4096, 24 * GB, most + 1).fits
    assert capacity.max_context(*args, 10 * GB) == 0 and capacity.max_batch(*args, 4096, 10 * GB) == 0


def test_nodes_needed_splits_weights_and_kv_but_not_runtime():
    assert capacity.nodes_needed(LLAMA_8B, 16 * GB, 8192, 24 * GB) == 1
    assert capacity.nodes_needed(LLAMA_8B, 40 * GB, 8192, 24 * GB) == 2
    assert capacity.nodes_needed(LLAMA_8B, 16 * GB, 8192, 10**6) == 0  # a box too small for activations


def test_kv_blocks_for():
    assert kv_blocks_for(LLAMA_8B, 16 * 131_072 * 10 + 5, block_size=16) == 10
    assert kv_blocks_for(LLAMA_8B, -1, block_size=16) == 0
    with pytest.raises(InvalidPlanInput):
        kv_blocks_for(LLAMA_8B, GB, block_size=0)


@pytest.mark.parametrize("context, batch", [(0, 1), (-5, 1), (10, 0)])
def test_nonsense_context_and_batch_are_refused(context, batch):
    with pytest.raises(InvalidPlanInput, match="must be a positive number"):
        check_fits(LLAMA_8B, GB, context, 24 * GB, batch)
