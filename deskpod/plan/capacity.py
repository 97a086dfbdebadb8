"""Admission control: does a model fit, how much KV cache does it get, and what if it does not.

Memory of a loaded LLM, per box:

    weights + KV cache (kv_bytes_per_token × context × batch) + activations + runtime overhead

The engine sizes its KV block pool with `kv_blocks_for` and refuses models with `check_fits`, the
same functions `deskpod plan` prints, so the planner and the engine cannot disagree. Across linked
boxes the layers are split in a pipeline: each box holds 1/n of the weights and of the KV cache, and
its own activations and runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from deskpod.errors import DeskpodError
from deskpod.plan.shape import InvalidPlanInput, ModelShape

# Prefill runs in chunks of this many tokens (the activations' high-water mark).
PREFILL_CHUNK = 2048
# The most boxes a pipeline split is planned over.
MAX_NODES = 64


class DoesNotFit(DeskpodError):
    """The model, at this context and batch, needs more memory than there is."""

    def __init__(self, message: str, plan: MemoryPlan) -> None:
        super().__init__(message)
        self.plan = plan


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per box. `weights` and `kv_cache` are this box's share of a pipeline split."""

    weights: int
    kv_cache: int
    kv_per_token: int  # all layers, one sequence, one token
    activations: int
    overhead: int
    context: int
    batch: int
    available: int
    nodes: int = 1

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.available

    def parts(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "kv_cache": self.kv_cache,
            "activations": self.activations,
            "runtime_overhead": self.overhead,
        }

    def describe(self) -> str:
        rows = [f"  {name.replace('_', ' '):<17}{gb(size):>10}" for name, size in self.parts().items()]
        per_box = " per box" if self.nodes > 1 else ""
        rows.append(f"  {'total' + per_box:<17}{gb(self.total):>10}   (available {gb(self.available)})")
        rows.append(f"  KV cache: {self.kv_per_token:,} bytes/token × {self.context:,} tokens × "
                    f"{self.batch} sequence{'s' * (self.batch > 1)}")
        return "\n".join(rows)


# The tokenizer's tables, as the engine holds them (vocabulary, merges, their Python and Rust objects): measured
# 32 MB for SmolLM2 (49k tokens), 69 MB for Qwen2.5 (152k), 94 MB for Gemma 3 (262k) -> about this per token.
TOKENIZER_BYTES_PER_TOKEN = 300


def runtime_bytes(shape: ModelShape, hardware) -> int:
    """What a box holds besides the model's tensors: its runtime (hardware.runtime_overhead_bytes) and, where the
    host's memory is the model's (unified memory, CPUs), the tokenizer's tables, which grow with the vocabulary."""
    tables = TOKENIZER_BYTES_PER_TOKEN * shape.vocab_size if hardware.unified else 0
    return hardware.runtime_overhead_bytes + tables


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def kv_bytes_per_token(shape: ModelShape, kv_dtype_bytes: int = 2) -> int:
    """K and V for every layer: 2 · layers · kv_heads · head_dim · bytes (Llama 3.1 8B: 131 072).

    Local-attention layers are counted in full: the paged cache stores every layer per token."""
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * kv_dtype_bytes


def activation_bytes(shape: ModelShape, context: int, batch: int = 1, act_bytes: int = 2) -> int:
    """The largest forward's live tensors: one prefill chunk (or the decode batch) through a block
    (residual, normed input, q/k/v, attention output, the MLP's gate and up), plus fp32 logits."""
    tokens = max(min(PREFILL_CHUNK, context * batch), batch)
    qkv = (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim
    mlp = 2 * shape.intermediate_size * max(1, shape.experts_per_token) + 2 * shape.shared_expert_size
    per_token = act_bytes * (3 * shape.hidden_size + qkv + shape.num_heads * shape.head_dim + mlp)
    return tokens * per_token + batch * shape.vocab_size * 4


def memory_plan(
    shape: ModelShape,
    weights_bytes: int,
    context: int,
    available_bytes: int,
    batch: int = 1,
    *,
    kv_dtype_bytes: int = 2,
    overhead_bytes: int = 0,
    nodes: int = 1,
) -> MemoryPlan:
    """The per-box memory plan; raises nothing (see `check_fits`)."""
    _check_positive(context=context, batch=batch, nodes=nodes)
    per_token = kv_bytes_per_token(shape, kv_dtype_bytes)
    return MemoryPlan(
        weights=math.ceil(weights_bytes / nodes),
        kv_cache=math.ceil(per_token * context * batch / nodes),
        kv_per_token=per_token,
        activations=activation_bytes(shape, context, batch),
        overhead=overhead_bytes,
        context=context,
        batch=batch,
        available=available_bytes,
        nodes=nodes,
    )


def check_fits(
    shape: ModelShape,
    weights_bytes: int,
    context: int,
    available_bytes: int,
    batch: int = 1,
    *,
    kv_dtype_bytes: int = 2,
    overhead_bytes: int = 0,
    nodes: int = 1,
) -> MemoryPlan:
    """The memory plan, or `DoesNotFit` whose message gives the breakdown and the ways out."""
    plan = memory_plan(shape, weights_bytes, context, available_bytes, batch,
                       kv_dtype_bytes=kv_dtype_bytes, overhead_bytes=overhead_bytes, nodes=nodes)
    if plan.fits:
        return plan
    message = (f"{shape.name} needs {gb(plan.total)} but {gb(available_bytes)} is available:\n"
               f"{plan.describe()}\nWays out:\n" + "\n".join(f"  - {w}" for w in ways_out(plan, shape)))
    raise DoesNotFit(message, plan)


def ways_out(plan: MemoryPlan, shape: ModelShape) -> list[str]:
    """What would make `plan` fit: a lower precision, a shorter context, a smaller batch, more boxes."""
    ways = []
    bits = 8 * plan.weights * plan.nodes / shape.total_params
    if bits > 4.6:
        at4 = plan.total - plan.weights + math.ceil(plan.weights * 4.5 / bits)
        verdict = "fits" if at4 <= plan.available else "still too big"
        ways.append(f"a lower precision: the weights are {bits:.1f} bits each; at 4.5 (--precision nvfp4 "
                    f"or q4_k) the total is {gb(at4)}, which {verdict}")
    kv_room = plan.available - (plan.total - plan.kv_cache)
    longest = kv_room * plan.nodes // (plan.kv_per_token * plan.batch) if kv_room > 0 else 0
    if 0 < longest < plan.context:
        ways.append(f"a shorter context: at most {longest:,} tokens fit (asked {plan.context:,})")
    if plan.batch > 1 and kv_room > 0:
        most = kv_room * plan.nodes // (plan.kv_per_token * plan.context)
        if most:
            ways.append(f"fewer concurrent sequences: at most {most} fit at {plan.context:,} tokens")
    boxes = nodes_needed(shape, plan.weights * plan.nodes, plan.context, plan.available, plan.batch,
                         kv_dtype_bytes=plan.kv_per_token // kv_bytes_per_token(shape, 1),
                         overhead_bytes=plan.overhead)
    if boxes:
        ways.append(f"linking boxes: {boxes} boxes like this one hold it, the layers split between them")
    return ways or ["none at this size: even the smallest settings exceed this box"]


def nodes_needed(
    shape: ModelShape,
    weights_bytes: int,
    context: int,
    available_bytes: int,
    batch: int = 1,
    *,
    kv_dtype_bytes: int = 2,
    overhead_bytes: int = 0,
) -> int:
    """The fewest identical boxes that hold the model in a pipeline split; 0 if none up to MAX_NODES."""
    for nodes in range(1, MAX_NODES + 1):
        plan = memory_plan(shape, weights_bytes, context, available_bytes, batch,
                           kv_dtype_bytes=kv_dtype_bytes, overhead_bytes=overhead_bytes, nodes=nodes)
        if plan.fits:
            return nodes
    return 0


def max_context(
    shape: ModelShape,
    weights_bytes: int,
    available_bytes: int,
    batch: int = 1,
    *,
    kv_dtype_bytes: int = 2,
    overhead_bytes: int = 0,
    nodes: int = 1,
    limit: int | None = None,
) -> int:
    """The longest context (tokens per sequence) whose KV cache fits beside the weights; 0 if none.
    Capped at `limit` (the model's trained maximum unless the caller lifts it)."""
    plan = memory_plan(shape, weights_bytes, PREFILL_CHUNK, available_bytes, batch,
                       kv_dtype_bytes=kv_dtype_bytes, overhead_bytes=overhead_bytes, nodes=nodes)
    room = available_bytes - plan.weights - plan.activations - plan.overhead
    tokens = max(0, room) * nodes // (plan.kv_per_token * batch)
    return tokens if limit is None else min(tokens, limit)


def max_batch(
    shape: ModelShape,
    weights_bytes: int,
    context: int,
    available_bytes: int,
    *,
    kv_dtype_bytes: int = 2,
    overhead_bytes: int = 0,
    nodes: int = 1,
) -> int:
    """The most sequences of `context` tokens that fit at once; 0 if not even one."""
    def fits(batch: int) -> bool:
        return memory_plan(shape, weights_bytes, context, available_bytes, batch,
                           kv_dtype_bytes=kv_dtype_bytes, overhead_bytes=overhead_bytes, nodes=nodes).fits

    low, high = 0, 1
    while fits(high) and high < 1 << 20:
        low, high = high, high * 2
    while high - low > 1:  # fits(low), not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def kv_blocks_for(shape: ModelShape, available_bytes_for_kv: int, block_size: int,
                  kv_dtype_bytes: int = 2) -> int:
    """How many KV blocks of `block_size` tokens fit in `available_bytes_for_kv` bytes."""
    _check_positive(block_size=block_size)
    block_bytes = block_size * kv_bytes_per_token(shape, kv_dtype_bytes)
    return max(0, available_bytes_for_kv) // block_bytes


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise InvalidPlanInput(f"{name} must be a positive number, got {value}")
