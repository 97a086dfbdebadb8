"""Integer group schemes: groups of 32 with float16 scales, the layouts ggml's Q4_1 and Q8_0 use too.

int4: asymmetric, 4-bit codes q in 0..15 with a float16 scale and min per group of 32: w = q * scale + min
      (scale = (max - min) / 15, like ggml's Q4_1), codes packed two per byte as in fp4.pack_nibbles.
int8: symmetric, int8 codes in -127..127 with a float16 scale per group of 32: w = q * scale
      (scale = amax / 127, like ggml's Q8_0).
The scales are rounded to float16 BEFORE the codes are chosen, so the codes fit the stored scales.
"""

from __future__ import annotations

import torch

from deskpod.quant import fp4

GROUP = 32
F16_MAX = torch.finfo(torch.float16).max


def _f16(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.abs().max() > F16_MAX:
        raise ValueError(f"weight too large for float16 group {what}s (|{what}| > {F16_MAX}); use fp8 or nvfp4")
    return x.to(torch.float16)


def _div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


def _valid(w: torch.Tensor) -> torch.Tensor:
    """[out, groups, 32] bool: True for real columns, False for the padding of the last group."""
    cols = torch.arange(-(-w.shape[1] // GROUP) * GROUP, device=w.device) < w.shape[1]
    return cols.reshape(1, -1, GROUP)


def quantize_int4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """w [out, in] float32 -> codes [out, ceil(in/2)], float16 scale and min [out, ceil(in/32)]."""
    g, valid = fp4.to_blocks(w, GROUP), _valid(w)
    lo = torch.where(valid, g, torch.inf).amin(dim=-1)  # the padding must not widen the range
    hi = torch.where(valid, g, -torch.inf).amax(dim=-1)
    mn, scale = _f16(lo, "min"), _f16((hi - lo) / 15, "scale")
    q = torch.round(_div(g - mn.float()[..., None], scale.float()[..., None])).clamp(0, 15)
    q = torch.where(valid, q, 0).to(torch.uint8)
    return {"weight": fp4.pack_nibbles(fp4.from_blocks(q, w.shape[1])), "weight_scale": scale, "weight_min": mn}


def dequantize_int4(data: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    q = fp4.to_blocks(fp4.unpack_nibbles(data["weight"], shape[1]).float(), GROUP)
    w = q * data["weight_scale"].float()[..., None] + data["weight_min"].float()[..., None]
    return fp4.from_blocks(w, shape[1])


def layout_int4(out: int, inp: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    groups = (out, -(-inp // GROUP))
    return {
        "weight": (torch.uint8, (out, -(-inp // 2))),
        "weight_scale": (torch.float16, groups),
        "weight_min": (torch.float16, groups),
    }


def quantize_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """w [out, in] float32 -> int8 codes [out, in] and float16 scales [out, ceil(in/32)]."""
    g = fp4.to_blocks(w, GROUP)
    scale = _f16(g.abs().amax(dim=-1) / 127, "scale")
    q = torch.round(_div(g, scale.float()[..., None])).clamp(-127, 127).to(torch.int8)
    return {"weight": fp4.from_blocks(q, w.shape[1]).contiguous(), "weight_scale": scale}


def dequantize_int8(data: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    q = fp4.to_blocks(data["weight"].float(), GROUP)
    return fp4.from_blocks(q * data["weight_scale"].float()[..., None], shape[1])


def layout_int8(out: int, inp: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {"weight": (torch.int8, (out, inp)), "weight_scale": (torch.float16, (out, -(-inp // GROUP)))}
