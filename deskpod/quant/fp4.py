"""FP4 E2M1 (OCP MX v1.0 / NVFP4 element format) and the two-codes-per-byte packing.

A code is 4 bits: sign (bit 3), exponent (bits 2..1, bias 1), mantissa (bit 0); the 8 magnitudes are
0, 0.5, 1, 1.5, 2, 3, 4, 6. There is no inf or NaN: encoding saturates to ±6.

Packing: element 2j goes in the LOW nibble of byte j, element 2j+1 in the high nibble. This is the
layout of torch.float4_e2m1fn_x2 (its header, c10/util/Float4_e2m1fn_x2.h: "val1 : val0" in bits
"7654 : 3210"; torch's test helper pack_uint4 does `data[1::2] << 4 | data[::2]`) and of NVIDIA
ModelOpt's NVFP4 checkpoints.
"""

from __future__ import annotations

import torch

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_MAX = 6.0

# Midpoints between consecutive magnitudes, and whether a tie there rounds up: ties go to the even code
# (mantissa bit 0), i.e. up when the upper neighbour's code is even.
_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """float tensor -> uint8 E2M1 codes (0..15): round to nearest even, saturate to ±6, keep the sign of
    zero. NaN is not representable: callers reject it first (it would encode as +-0)."""
    x = x.to(torch.float32)
    a = x.abs()
    mag = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for mid, tie_up in _MIDPOINTS:  # the magnitude's code is how many midpoints it lies above
        mag += (a >= mid if tie_up else a > mid).to(torch.uint8)
    return mag | (x.signbit().to(torch.uint8) << 3)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """uint8 E2M1 codes (0..15) -> float32."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    return table[codes.long()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., n] (values 0..15) -> bytes [..., ceil(n/2)]; an odd n is padded with code 0."""
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """bytes [..., m] -> uint8 codes [..., n] (n <= 2m): the inverse of pack_nibbles."""
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)
    return codes[..., :n]


def to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """[out, in] -> [out, ceil(in/block), block], the last block zero-padded (shared by the block schemes)."""
    pad = -w.shape[1] % block
    return torch.nn.functional.pad(w, (0, pad)).reshape(w.shape[0], -1, block)


def from_blocks(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """[out, nblocks, block] -> [out, n]: the inverse of to_blocks (crops the padding)."""
    return blocks.reshape(blocks.shape[0], -1)[:, :n]
