"""Roofline speed estimates: prefill is compute-bound, decode is bandwidth-bound.

    prefill time = 2 · (active_params − LM head) · tokens (+ attention, + the head once: only the last
                   token's logits are computed) / (peak_flops · prefill_efficiency)
    decode step  = bytes read per step / (bandwidth · decode_efficiency)
                   bytes = dense weights + the experts the batch routes to + LM head + KV read
    each step is also at least its FLOPs at the prefill rate (large batches become compute-bound)
    across n boxes, pipeline (linked DIGITS): the layers split n ways, a step crosses n − 1 hops of
    (link latency + batch · hidden · 2 bytes / link bandwidth); tensor parallel (NVLink GPUs): each
    layer splits n ways, with two all-reduces per layer

The efficiency factors belong to the hardware profile (see deskpod.plan.devices for their
calibration); everything else comes from the shape and the precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from deskpod.plan.capacity import PREFILL_CHUNK
from deskpod.plan.devices import Hardware
from deskpod.plan.precision import Scheme
from deskpod.plan.shape import ModelShape
from deskpod.plan.weights import WeightBytes

# Mixture-of-experts prefill reaches this share of a dense model's efficiency: a chunk's tokens are
# scattered over many experts, so each expert's GEMM is small (and routing costs extra). Calibrated on
# llama.cpp's DGX Spark runs of gpt-oss-20b, gpt-oss-120b and Qwen3-30B-A3B, which reach 0.45, 0.32
# and 0.35 of the dense roofline.
MOE_PREFILL_FACTOR = 0.4


@dataclass(frozen=True)
class SpeedEstimate:
    prompt_tokens: int
    prefill_tokens_per_s: float
    ttft_s: float  # prefill of the prompt, then one decode step
    decode_tokens_per_s: float  # one sequence, right after the prompt
    decode_throughput: float  # all `batch` sequences together, tokens/s
    decode_bytes_per_token: int  # read by a batch-1 step
    link_s_per_token: float  # the hops between boxes in a batch-1 step
    batch: int


def kv_read_bytes(shape: ModelShape, depth: int, kv_dtype_bytes: int = 2) -> int:
    """KV bytes one sequence reads per step at `depth` tokens (local layers read only their window)."""
    per_layer = 2 * shape.num_kv_heads * shape.head_dim * kv_dtype_bytes
    local = shape.sliding_layers * min(depth, shape.sliding_window or depth)
    full = (shape.num_layers - shape.sliding_layers) * depth
    return per_layer * (local + full)


def attention_flops(shape: ModelShape, queries: int, depth: int) -> float:
    """QKᵀ and PV for `queries` tokens each attending to about `depth` earlier tokens."""
    span_full = (shape.num_layers - shape.sliding_layers) * depth
    span_local = shape.sliding_layers * min(depth, shape.sliding_window or depth)
    return 4.0 * shape.num_heads * shape.head_dim * queries * (span_full + span_local)


def link_s(hw: Hardware, shape: ModelShape, nodes: int, tokens: int, chunks: int = 1) -> float:
    """Moving `tokens` hidden states (bf16) between boxes during one forward of `chunks` pieces.

    Pipeline: each of the n − 1 hops sends them once. Tensor parallel: two all-reduces per layer,
    each a ring moving 2·(n − 1)/n of the data, plus a latency per all-reduce and chunk."""
    if nodes <= 1:
        return 0.0
    data = tokens * shape.hidden_size * 2 / hw.link_bandwidth
    if hw.tensor_parallel:
        return 2 * shape.num_layers * (chunks * hw.link_latency + 2 * (nodes - 1) / nodes * data)
    return (nodes - 1) * (chunks * hw.link_latency + data)


def decode_step_s(shape: ModelShape, weights: WeightBytes, hw: Hardware, scheme: Scheme,
                  depth: int, batch: int = 1, kv_dtype_bytes: int = 2) -> float:
    """One decode step of `batch` sequences at `depth` on one box holding the whole model."""
    nbytes = weights.read_per_step(shape, batch) + batch * kv_read_bytes(shape, depth, kv_dtype_bytes)
    flops = batch * (2.0 * shape.active_params + attention_flops(shape, 1, depth))
    memory_s = nbytes / (hw.bandwidth * hw.decode_efficiency)
    compute_s = flops / (hw.peak_flops(scheme.compute) * hw.prefill_efficiency)
    return max(memory_s, compute_s)


def prefill_s(shape: ModelShape, weights: WeightBytes, hw: Hardware, scheme: Scheme,
              prompt: int, nodes: int = 1) -> float:
    """Prefill of one prompt in chunks. Over n boxes the work splits n ways: each layer's (tensor
    parallel), or the layers themselves with the chunks flowing through the pipeline."""
    chunks = math.ceil(prompt / PREFILL_CHUNK)
    head = shape.vocab_size * shape.hidden_size  # multiplied by the last token only: engines skip the others' logits
    flops = 2.0 * ((shape.active_params - head) * prompt + head) + attention_flops(shape, prompt, prompt // 2)
    efficiency = hw.prefill_efficiency * (MOE_PREFILL_FACTOR if shape.is_moe else 1.0)
    compute_s = flops / (hw.peak_flops(scheme.compute) * efficiency)
    reads = chunks * weights.read_per_step(shape, min(prompt, PREFILL_CHUNK))
    memory_s = reads / (hw.bandwidth * hw.decode_efficiency)
    one_box = max(compute_s, memory_s)
    share = 1 / nodes if hw.tensor_parallel else (chunks + nodes - 1) / (chunks * nodes)
    return one_box * share + link_s(hw, shape, nodes, prompt, chunks)


def decode_s(shape: ModelShape, weights: WeightBytes, hw: Hardware, scheme: Scheme,
             depth: int, batch: int, nodes: int, kv_dtype_bytes: int = 2) -> float:
    """Time for every one of `batch` sequences to gain a token, over n boxes.

    Tensor parallel: each box does 1/n of each step. Pipeline: B sequences in m = min(B, n)
    micro-batches; each passes all n boxes in turn (latency) while each box works through m
    micro-batches per step (occupancy); the slower of the two paces a step."""
    if nodes > 1 and hw.tensor_parallel:
        step = decode_step_s(shape, weights, hw, scheme, depth, batch, kv_dtype_bytes)
        return step / nodes + link_s(hw, shape, nodes, batch)
    micro = min(batch, nodes)
    size = math.ceil(batch / micro)
    step = decode_step_s(shape, weights, hw, scheme, depth, size, kv_dtype_bytes)
    return max(step + link_s(hw, shape, nodes, size), step * micro / nodes)


def estimate(shape: ModelShape, weights: WeightBytes, hw: Hardware, scheme: Scheme, *,
             prompt: int, batch: int = 1, nodes: int = 1, kv_dtype_bytes: int = 2) -> SpeedEstimate:
    """Prefill of a `prompt`-token prompt, then decode right after it, on `nodes` boxes."""
    one = decode_s(shape, weights, hw, scheme, prompt, 1, nodes, kv_dtype_bytes)
    first = prefill_s(shape, weights, hw, scheme, prompt, nodes)
    return SpeedEstimate(
        prompt_tokens=prompt,
        prefill_tokens_per_s=prompt / first,
        ttft_s=first + one,
        decode_tokens_per_s=1 / one,
        decode_throughput=batch / decode_s(shape, weights, hw, scheme, prompt, batch, nodes, kv_dtype_bytes),
        decode_bytes_per_token=weights.read_per_step(shape, 1) + kv_read_bytes(shape, prompt, kv_dtype_bytes),
        link_s_per_token=link_s(hw, shape, nodes, 1),
        batch=batch,
    )
