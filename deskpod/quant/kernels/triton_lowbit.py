"""Triton kernels for GPUs: y = x @ W^T with W decoded tile by tile inside the kernel.

One kernel serves every scheme of deskpod.quant (KIND picks the decoder at compile time): each program
computes a [BM, BN] tile of y, loading the codes of a [BN, BK] weight tile (BK/2 bytes a row for 4-bit
codes) and their group scales per step of K and decoding them in registers, so the full dequantized
weight never exists in memory. FP4 and FP8 codes are
decoded by building the float32 bit pattern (exact, no exp2 approximations). For NVFP4, MXFP4 and FP8
the decoded tile (code * block scale) is exact in bfloat16 (the activations' dtype on GPU), and the per-tensor (NVFP4) or per-row (FP8)
scale is applied once to the accumulator at the end.

Tested on CPU under TRITON_INTERPRET=1 against QuantizedTensor.dequantize() + matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from deskpod.quant.tensor import QuantizedTensor

NVFP4, MXFP4, FP8_E4M3, FP8_E5M2, INT4, INT8 = range(6)


@triton.jit
def _minifloat(c, MBITS: tl.constexpr, BIAS: tl.constexpr):
    """Magnitude bits c (int32, sign removed) of a float with MBITS mantissa bits -> float32."""
    e = c >> MBITS
    m = c & ((1 << MBITS) - 1)
    normal = (((e + (127 - BIAS)) << 23) | (m << (23 - MBITS))).to(tl.float32, bitcast=True)
    subnormal = m.to(tl.float32) * (2.0 ** (1 - BIAS - MBITS))
    return tl.where(e == 0, subnormal, normal)


@triton.jit
def _signed(mag, c, SIGN: tl.constexpr):
    return tl.where((c & SIGN) != 0, -mag, mag)


@triton.jit
def _nibbles(w_ptr, rn, k0, stride_wn, N, K, BN: tl.constexpr, BK: tl.constexpr):
    """[BN, BK] 4-bit codes from [BN, BK/2] bytes: element 2j is byte j's low nibble, 2j+1 its high one."""
    rb = k0 // 2 + tl.arange(0, BK // 2)
    mask = (rn[:, None] < N) & (rb[None, :] < (K + 1) // 2)
    b = tl.load(w_ptr + rn[:, None] * stride_wn + rb[None, :], mask=mask, other=0).to(tl.int32)
    return tl.join(b & 0xF, b >> 4).reshape(BN, BK)


@triton.jit
def _bytes_tile(w_ptr, rn, k0, stride_wn, N, K, BK: tl.constexpr):
    """[BN, BK] one-byte codes (FP8, int8)."""
    rk = k0 + tl.arange(0, BK)
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    return tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=mask, other=0)


@triton.jit
def _group_scales(s_ptr, rn, k0, stride_sn, N, K, BK: tl.constexpr, GROUP: tl.constexpr):
    """[BN, BK/GROUP] scales of the groups this K step covers."""
    rg = k0 // GROUP + tl.arange(0, BK // GROUP)
    mask = (rn[:, None] < N) & (rg[None, :] < (K + GROUP - 1) // GROUP)
    return tl.load(s_ptr + rn[:, None] * stride_sn + rg[None, :], mask=mask, other=0)


@triton.jit
def _per_group(w, s, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    """w [BN, BK] times s [BN, BK/GROUP], one scale per GROUP consecutive columns."""
    return (w.reshape(BN, BK // GROUP, GROUP) * s[:, :, None]).reshape(BN, BK)


@triton.jit
def _decode_tile(w_ptr, s_ptr, a_ptr, rn, k0, stride_wn, stride_sn, N, K,
                 KIND: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """[BN, BK] float32 weights of rows rn, columns k0.. (before any per-row/per-tensor scale)."""
    if KIND == 0:  # NVFP4: E2M1 * E4M3 block scale (weight_scale_2 applied to the accumulator)
        c = _nibbles(w_ptr, rn, k0, stride_wn, N, K, BN, BK)
        s = _group_scales(s_ptr, rn, k0, stride_sn, N, K, BK, GROUP).to(tl.int32)
        w = _per_group(_signed(_minifloat(c & 7, 1, 1), c, 8), _minifloat(s & 0x7F, 3, 7), BN, BK, GROUP)
    elif KIND == 1:  # MXFP4: E2M1 * E8M0 (2^(s-127); s = 0 is the subnormal 2^-127)
        c = _nibbles(w_ptr, rn, k0, stride_wn, N, K, BN, BK)
        s = _group_scales(s_ptr, rn, k0, stride_sn, N, K, BK, GROUP).to(tl.int32)
        scale = tl.where(s == 0, 0x00400000, s << 23).to(tl.float32, bitcast=True)
        w = _per_group(_signed(_minifloat(c & 7, 1, 1), c, 8), scale, BN, BK, GROUP)
    elif KIND == 2:  # FP8 E4M3FN (per-row scale applied to the accumulator)
        c = _bytes_tile(w_ptr, rn, k0, stride_wn, N, K, BK).to(tl.int32)
        w = _signed(_minifloat(c & 0x7F, 3, 7), c, 0x80)
    elif KIND == 3:  # FP8 E5M2
        c = _bytes_tile(w_ptr, rn, k0, stride_wn, N, K, BK).to(tl.int32)
        w = _signed(_minifloat(c & 0x7F, 2, 15), c, 0x80)
    elif KIND == 4:  # int4: q * scale + min, float16 scale and min per group
        q = _nibbles(w_ptr, rn, k0, stride_wn, N, K, BN, BK).to(tl.float32)
        s = _group_scales(s_ptr, rn, k0, stride_sn, N, K, BK, GROUP).to(tl.float32)
        mn = _group_scales(a_ptr, rn, k0, stride_sn, N, K, BK, GROUP).to(tl.float32)
        w = (q.reshape(BN, BK // GROUP, GROUP) * s[:, :, None] + mn[:, :, None]).reshape(BN, BK)
    else:  # int8: q * scale
        q = _bytes_tile(w_ptr, rn, k0, stride_wn, N, K, BK).to(tl.float32)
        w = _per_group(q, _group_scales(s_ptr, rn, k0, stride_sn, N, K, BK, GROUP).to(tl.float32), BN, BK, GROUP)
    return w


@triton.jit
def _lowbit_matmul(
    x_ptr, w_ptr, s_ptr, a_ptr, y_ptr,
    M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
    KIND: tl.constexpr, GROUP: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    # x: [M, K], codes of W: [N, ...], y: [M, N]
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0)
        w = _decode_tile(w_ptr, s_ptr, a_ptr, rn, k0, stride_wn, stride_sn, N, K, KIND, GROUP, BN, BK).to(x.dtype)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    if KIND == 0:  # NVFP4's per-tensor scale
        acc = acc * tl.load(a_ptr)
    elif KIND == 2 or KIND == 3:  # FP8's per-row scale
        acc = acc * tl.load(s_ptr + rn, mask=rn < N, other=0)[None, :]
    y_mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@dataclass(frozen=True)
class Kind:
    """How one scheme's tensors feed the kernel: codes, scales, and the extra tensor (min / scale_2)."""

    kind: int
    group: int
    scale: str
    aux: str | None = None


KINDS = {
    "nvfp4": Kind(NVFP4, 16, "weight_scale", "weight_scale_2"),
    "mxfp4": Kind(MXFP4, 32, "weight_scale"),
    "fp8": Kind(FP8_E4M3, 1, "weight_scale"),
    "fp8_e5m2": Kind(FP8_E5M2, 1, "weight_scale"),
    "int4": Kind(INT4, 32, "weight_scale", "weight_min"),
    "int8": Kind(INT8, 32, "weight_scale"),
}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """Contiguous rows; float8 tensors as their bytes (the kernel decodes the bits itself)."""
    t = t.contiguous()
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def launch_args(x: torch.Tensor, qt: QuantizedTensor, block: tuple[int, int, int], y: torch.Tensor):
    """The kernel's runtime arguments and compile-time constants for y = x @ dequantize(qt)^T."""
    spec, (n, k) = KINDS[qt.scheme], qt.shape
    w, s = _bytes(qt.data["weight"]), _bytes(qt.data[spec.scale])
    aux = _bytes(qt.data[spec.aux]) if spec.aux else s
    args = {
        "x_ptr": x, "w_ptr": w, "s_ptr": s, "a_ptr": aux, "y_ptr": y, "M": x.shape[0], "N": n, "K": k,
        "stride_xm": x.stride(0), "stride_wn": w.stride(0), "stride_sn": s.stride(0), "stride_ym": y.stride(0),
    }  # fmt: skip
    bm, bn, bk = block
    constants = {"KIND": spec.kind, "GROUP": spec.group, "IEEE": x.dtype == torch.float32, "BM": bm, "BN": bn, "BK": bk}
    return args, constants


def default_block(m: int) -> tuple[int, int, int]:
    """Tile sizes (BM, BN, BK) for M rows of activations: BM grows with M from 16 (decode) to 64 (prefill)."""
    return (min(64, max(16, triton.next_power_of_2(m))), 64, 64)


def matmul(x: torch.Tensor, qt: QuantizedTensor, block: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [M, in] @ dequantize(qt)^T -> [M, out] in x's dtype, decoding qt inside the kernel.

    block = (BM, BN, BK): tile sizes (powers of two >= 16, BK a multiple of the scheme's group of 16 or 32);
    default_block(M) when None."""
    if qt.scheme not in KINDS:
        raise ValueError(f"no Triton kernel for scheme {qt.scheme!r}; kernels exist for {', '.join(KINDS)}")
    if x.dim() != 2 or x.shape[1] != qt.shape[1]:
        raise ValueError(f"x must be [M, {qt.shape[1]}] for a {list(qt.shape)} weight, got {list(x.shape)}")
    x = x.contiguous()
    y = torch.empty((x.shape[0], qt.shape[0]), dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return y
    block = block or default_block(x.shape[0])
    args, constants = launch_args(x, qt, block, y)
    grid = (triton.cdiv(x.shape[0], block[0]), triton.cdiv(qt.shape[0], block[1]))
    # no FP fusion: q * scale + min rounds like the reference (and Triton 3.9 warns when it is left unset)
    _lowbit_matmul[grid](**args, **constants, enable_fp_fusion=False)
    return y
