"""The GPU path of a Mixture-of-Experts layer: every chosen expert's projection in one Triton kernel launch, its
weights decoded tile by tile as triton_lowbit decodes them (any scheme of deskpod.quant).

The (token, expert) pairs of a batch — slots, token t's j-th choice being slot t * top_k + j — are sorted by
expert and each expert's run padded to a multiple of BM (`align`), so that every block of BM slots belongs to
one expert. A program computes one [BM, BN] tile of the output for its block's expert: an expert no token
chose has no block, and its weights are never read; a decode token reads exactly its top_k experts.
`experts_forward` is the whole layer on that: gate/up for every slot, the activation, down, each slot's
output weighted by its router weight and added into its token's row.

Tested on CPU under TRITON_INTERPRET=1 against the PyTorch reference (dequantized weights, per-expert matmuls).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from deskpod.quant.kernels.triton_lowbit import KINDS, _bytes, _decode_tile
from deskpod.quant.tensor import QuantizedTensor


@triton.jit
def _grouped_matmul(
    x_ptr, w_ptr, s_ptr, a_ptr, y_ptr, slots_ptr, experts_ptr,
    num_slots, N, K, stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_ae, stride_ym,
    SLOTS_PER_ROW: tl.constexpr, KIND: tl.constexpr, GROUP: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    # y[slot] = x[slot // SLOTS_PER_ROW] @ W[expert]^T for the BM slots of this block, all of one expert
    e = tl.load(experts_ptr + tl.program_id(0)).to(tl.int64)
    slots = tl.load(slots_ptr + tl.program_id(0) * BM + tl.arange(0, BM))
    valid = slots < num_slots  # the padding after an expert's last slot
    rm = slots // SLOTS_PER_ROW
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    w_e, s_e, a_e = w_ptr + e * stride_we, s_ptr + e * stride_se, a_ptr + e * stride_ae
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=valid[:, None] & (rk[None, :] < K), other=0)
        w = _decode_tile(w_e, s_e, a_e, rn, k0, stride_wn, stride_sn, N, K, KIND, GROUP, BN, BK).to(x.dtype)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    if KIND == 0:  # NVFP4's per-tensor scale, one per expert
        acc = acc * tl.load(a_e)
    elif KIND == 2 or KIND == 3:  # FP8's per-row scale
        acc = acc * tl.load(s_e + rn, mask=rn < N, other=0)[None, :]
    y_mask = valid[:, None] & (rn[None, :] < N)
    tl.store(y_ptr + slots[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@dataclass(frozen=True)
class StackedExperts:
    """One projection of every expert, in one scheme: each stored tensor stacked on a leading expert axis
    ([experts, ...]; a per-tensor scale becomes [experts]). Expert e's QuantizedTensor is `expert(e)` (views)."""

    scheme: str
    shape: tuple[int, int]  # each expert's [out, in]
    data: dict[str, torch.Tensor]

    @property
    def count(self) -> int:
        return next(iter(self.data.values())).shape[0]

    def expert(self, e: int) -> QuantizedTensor:
        return QuantizedTensor(self.scheme, self.shape, {name: t[e] for name, t in self.data.items()})


def stack_experts(experts: Sequence[QuantizedTensor]) -> StackedExperts:
    """The experts' tensors stacked (a copy); ValueError unless they share one scheme and shape."""
    first = experts[0]
    if any(q.scheme != first.scheme or q.shape != first.shape for q in experts):
        raise ValueError("experts to stack must share one scheme and shape")
    if first.scheme not in KINDS:
        raise ValueError(f"no Triton kernel for scheme {first.scheme!r}; kernels exist for {', '.join(KINDS)}")
    return StackedExperts(first.scheme, first.shape, {name: torch.stack([q.data[name] for q in experts])
                                                      for name in first.data})


def align(chosen: torch.Tensor, num_experts: int, bm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """chosen [tokens, top_k] expert ids -> (slots [P] int32: slot numbers sorted by expert, each expert's run
    padded to a multiple of bm with the out-of-range slot tokens * top_k; experts [P / bm] int32: the expert
    of each block of bm)."""
    flat = chosen.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + bm - 1) // bm * bm
    padded_start = torch.cumsum(padded, 0) - padded
    start = torch.cumsum(counts, 0) - counts
    experts_sorted = flat[order]
    rank = torch.arange(flat.numel(), device=flat.device) - start[experts_sorted]
    slots = torch.full((int(padded.sum()),), flat.numel(), dtype=torch.int32, device=flat.device)
    slots[padded_start[experts_sorted] + rank] = order.to(torch.int32)
    block_experts = torch.repeat_interleave(torch.arange(num_experts, device=flat.device), padded // bm)
    return slots, block_experts.to(torch.int32)


def default_block(slots: int) -> tuple[int, int, int]:
    return (min(64, max(16, triton.next_power_of_2(slots))), 64, 64)


def grouped_matmul(x: torch.Tensor, experts: StackedExperts, slots: torch.Tensor, block_experts: torch.Tensor,
                   num_slots: int, slots_per_row: int, block: tuple[int, int, int]) -> torch.Tensor:
    """y [num_slots, out]: y[s] = x[s // slots_per_row] @ W[expert of s]^T, for the slots `align` laid out."""
    spec, (n, k) = KINDS[experts.scheme], experts.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [rows, {k}] for experts of shape {list(experts.shape)}, got {list(x.shape)}")
    x = x.contiguous()
    y = torch.zeros((num_slots, n), dtype=x.dtype, device=x.device)
    if num_slots == 0 or slots.numel() == 0:
        return y
    w, s = _bytes(experts.data["weight"]), _bytes(experts.data[spec.scale])
    a = _bytes(experts.data[spec.aux]) if spec.aux else s
    bm, bn, bk = block
    grid = (slots.numel() // bm, triton.cdiv(n, bn))
    _grouped_matmul[grid](
        x, w, s, a, y, slots, block_experts, num_slots, n, k, x.stride(0),
        w.stride(0), w.stride(1), s.stride(0), s.stride(1) if s.dim() > 1 else 0, a.stride(0), y.stride(0),
        SLOTS_PER_ROW=slots_per_row, KIND=spec.kind, GROUP=spec.group, IEEE=x.dtype == torch.float32,
        BM=bm, BN=bn, BK=bk, enable_fp_fusion=False,
    )  # fmt: skip
    return y


def experts_forward(x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, gate_up: StackedExperts,
                    down: StackedExperts, activation: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
                    block: tuple[int, int, int] | None = None) -> torch.Tensor:
    """A MoE layer's experts for tokens x [T, hidden], routed to `chosen` [T, top_k] with router `weights`:
    sum_j weights[t, j] * down_e(act(gate_e(x_t), up_e(x_t))), e = chosen[t, j]. gate_up rows are the gate's
    then the up's; biases are [experts, out]."""
    tokens, top_k = chosen.shape
    num_slots = tokens * top_k
    block = block or default_block(num_slots)
    slots, block_experts = align(chosen, gate_up.count, block[0])
    h = grouped_matmul(x, gate_up, slots, block_experts, num_slots, top_k, block)
    expert_of_slot = chosen.flatten()
    if gate_up_bias is not None:
        h = h + gate_up_bias[expert_of_slot].to(h.dtype)
    gate, up = h.split(gate_up.shape[0] // 2, dim=-1)
    y = grouped_matmul(activation(gate, up), down, slots, block_experts, num_slots, 1, block)
    if down_bias is not None:
        y = y + down_bias[expert_of_slot].to(y.dtype)
    y = y * weights.reshape(-1, 1).to(y.dtype)
    return y.reshape(tokens, top_k, -1).sum(dim=1)
