"""NVFP4: E2M1 elements, one FP8 E4M3 scale per 16 elements, one FP32 scale per tensor.

NVIDIA's two-level recipe (ModelOpt's NVFP4QTensor): scale_2 = amax(tensor) / (6 * 448) so that every
block scale amax(block) / 6 / scale_2 fits E4M3 (<= 448); the block scale is rounded to E4M3 and the
elements are divided by the ROUNDED scale (times scale_2) before rounding to E2M1, so the error of the
scale is compensated where possible. w = e2m1(code) * float(weight_scale) * weight_scale_2.
"""

from __future__ import annotations

import torch

from deskpod.quant import fp4, fp8

BLOCK = 16


def _div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where den == 0 (an all-zero block or tensor)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


def quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """w [out, in] float32 -> packed codes [out, ceil(in/2)], E4M3 block scales, FP32 tensor scale."""
    blocks = fp4.to_blocks(w, BLOCK)  # [out, nb, 16]
    scale_2 = w.abs().amax() / (fp4.E2M1_MAX * fp8.FORMATS["e4m3fn"].max)
    block_amax = blocks.abs().amax(dim=-1)  # [out, nb]
    scale_codes = fp8.encode(_div(block_amax / fp4.E2M1_MAX, scale_2), "e4m3fn", saturate=True)
    denom = fp8.decode(scale_codes, "e4m3fn") * scale_2
    codes = fp4.encode_e2m1(_div(blocks, denom[..., None]))
    codes = fp4.from_blocks(codes, w.shape[1])
    return {
        "weight": fp4.pack_nibbles(codes),
        "weight_scale": scale_codes.view(torch.float8_e4m3fn),
        "weight_scale_2": scale_2.to(torch.float32),
    }


def dequantize(data: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    values = fp4.to_blocks(fp4.decode_e2m1(fp4.unpack_nibbles(data["weight"], shape[1])), BLOCK)
    # e2m1 * e4m3 is exact (2 + 4 significant bits), so the only rounding is the one by scale_2
    exact = values * fp8.decode(data["weight_scale"], "e4m3fn")[..., None]
    return fp4.from_blocks(exact * data["weight_scale_2"].float(), shape[1])


def layout(out: int, inp: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {
        "weight": (torch.uint8, (out, -(-inp // 2))),
        "weight_scale": (torch.float8_e4m3fn, (out, -(-inp // BLOCK))),
        "weight_scale_2": (torch.float32, ()),
    }
