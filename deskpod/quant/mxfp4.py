"""MXFP4 (OCP Microscaling Formats v1.0): E2M1 elements sharing one E8M0 scale per 32.

Shared scale X = 2^(floor(log2(amax(block))) - 2), 2 being E2M1's largest exponent (6 = 1.5 * 2^2);
elements are divided by X, rounded to nearest even and saturated to ±6 (the spec's conversion, which
clamps the top of the block since amax / X can reach 7.99). E8M0 stores X's exponent + 127: 0..254 mean
2^-127..2^127, 255 is NaN (a NaN scale makes the whole block NaN). As in the spec's reference code
(microsoft/microxcaling, clamp_shared_exp): exponents below -127 are clamped to -127 (an all-zero block
gets code 0), and a block whose amax is NaN or inf (an overflowing exponent) gets the NaN scale.
quantize() refuses non-finite weights before they get here; encode_blocks() handles them for completeness.
"""

from __future__ import annotations

import torch

from deskpod.quant import fp4

BLOCK = 32
EMAX_ELEM = 2
E8M0_BIAS, E8M0_NAN = 127, 255


def encode_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """blocks [..., 32] float32 -> (E2M1 codes [..., 32], E8M0 scale codes [...])."""
    amax = blocks.abs().amax(dim=-1)
    # frexp: amax = m * 2^e with m in [0.5, 1), so floor(log2(amax)) = e - 1 exactly (no log2 rounding)
    exp = torch.frexp(amax).exponent - 1 - EMAX_ELEM
    exp = torch.where(amax > 0, exp, -E8M0_BIAS).clamp(-E8M0_BIAS, E8M0_BIAS)
    codes = fp4.encode_e2m1(torch.ldexp(blocks, -exp[..., None].float()))
    scale = torch.where(amax.isfinite(), exp + E8M0_BIAS, E8M0_NAN).to(torch.uint8)
    return codes, scale


def decode_scale(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 codes (uint8) -> float32 2^(code - 127); 255 -> NaN."""
    value = torch.ldexp(torch.ones(scale.shape, device=scale.device), scale.int() - E8M0_BIAS)
    return torch.where(scale == E8M0_NAN, torch.nan, value)


def quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """w [out, in] float32 -> packed codes [out, ceil(in/2)] and E8M0 scales [out, ceil(in/32)]."""
    codes, scale = encode_blocks(fp4.to_blocks(w, BLOCK))
    return {"weight": fp4.pack_nibbles(fp4.from_blocks(codes, w.shape[1])), "weight_scale": scale}


def dequantize(data: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    values = fp4.to_blocks(fp4.decode_e2m1(fp4.unpack_nibbles(data["weight"], shape[1])), BLOCK)
    return fp4.from_blocks(values * decode_scale(data["weight_scale"])[..., None], shape[1])


def layout(out: int, inp: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {"weight": (torch.uint8, (out, -(-inp // 2))), "weight_scale": (torch.uint8, (out, -(-inp // BLOCK)))}
