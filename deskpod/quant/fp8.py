"""FP8 E4M3FN and E5M2: a bit-exact codec in integer tensor ops, and the per-row-scaled fp8 schemes.

The codec reproduces torch's casts (c10's fp8e4m3fn/fp8e5m2_from_fp32_value) bit for bit, so it works
on any device and with any torch, and the stored bytes can be viewed as torch.float8_* where that dtype
exists. torch 2.13's casts: E4M3FN (no inf) saturates, so |x| >= 464 (the midpoint above 448) and
±inf become ±448, NaN becomes S.1111.111; E5M2 rounds |x| >= 61440 to ±inf (0x7C) and NaN
becomes S.11111.11. `encode(..., saturate=True)` also clamps E5M2 to ±57344, which quantization wants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

F32_INF_BITS = 0x7F800000


@dataclass(frozen=True)
class FP8Format:
    name: str
    mbits: int
    bias: int
    max: float  # largest finite value
    dtype_name: str  # the torch dtype with this encoding (torch.float8_*), where it exists
    # |x| bits (as float32) at or above `overflow_bits` encode as `overflow_code`; NaN as `nan_code`
    overflow_bits: int
    overflow_code: int
    nan_code: int = 0x7F

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype_name)


FORMATS = {
    # 464.0 = 0x43E80000: the 448..480 midpoint; at and above it (inf included) torch saturates to 448
    "e4m3fn": FP8Format("e4m3fn", 3, 7, 448.0, "float8_e4m3fn", 0x43E80000, 0x7E),
    # 65536.0 = 0x47800000 = 2^16: above the largest E5M2 binade, i.e. inf
    "e5m2": FP8Format("e5m2", 2, 15, 57344.0, "float8_e5m2", 0x47800000, 0x7C),
}


def encode(x: torch.Tensor, fmt: str = "e4m3fn", saturate: bool = False) -> torch.Tensor:
    """float tensor -> uint8 fp8 bit patterns, round to nearest even (torch's cast semantics).

    saturate=True clamps finite values to ±max first (NaN stays NaN)."""
    f = FORMATS[fmt]
    x = x.to(torch.float32)
    if saturate:
        x = x.clamp(-f.max, f.max)  # ±inf too; NaN stays NaN
    bits = x.view(torch.int32)
    a = bits & 0x7FFFFFFF
    shift = 23 - f.mbits
    # normal results: rebias the exponent, round the dropped mantissa bits to nearest even
    code = a - ((127 - f.bias) << 23)
    code += (1 << (shift - 1)) - 1
    code += (a >> shift) & 1
    code >>= shift
    # subnormal results: let the FPU round by adding a magic number whose ulp is the fp8 subnormal step
    magic_bits = ((127 - f.bias) + shift + 1) << 23
    magic = torch.tensor(magic_bits, dtype=torch.int32).view(torch.float32).item()
    sub = (a.view(torch.float32) + magic).view(torch.int32)
    sub -= magic_bits
    code = torch.where(a < ((128 - f.bias) << 23), sub, code)
    code.masked_fill_(a >= f.overflow_bits, f.overflow_code)
    code.masked_fill_(a > F32_INF_BITS, f.nan_code)
    code = code.to(torch.uint8)
    code |= ((bits >> 24) & 0x80).to(torch.uint8)  # the sign, NaN's included
    return code


def _table(f: FP8Format) -> torch.Tensor:
    """The 256 values of a format, computed from its definition (not from torch's dtype)."""
    c = torch.arange(256, dtype=torch.int64)
    e, m = (c >> f.mbits) & ((1 << (7 - f.mbits)) - 1), (c & ((1 << f.mbits) - 1)).double()
    mag = torch.where(e == 0, m * 2.0 ** (1 - f.bias - f.mbits), (1 + m / 2**f.mbits) * torch.exp2((e - f.bias).double()))
    emax = (1 << (7 - f.mbits)) - 1
    if f.name == "e5m2":  # IEEE-style: top exponent is inf (mantissa 0) or NaN
        mag = torch.where(e == emax, torch.where(m == 0, torch.inf, torch.nan), mag)
    else:  # FN: only S.1111.111 is NaN; no inf
        mag = torch.where((c & 0x7F) == 0x7F, torch.nan, mag)
    return torch.where(c >= 128, -mag, mag).float()


TABLES = {name: _table(f) for name, f in FORMATS.items()}


def decode(codes: torch.Tensor, fmt: str = "e4m3fn") -> torch.Tensor:
    """uint8 fp8 bit patterns (or a torch.float8_* tensor) -> float32."""
    table = TABLES[fmt].to(codes.device)
    return table[codes.view(torch.uint8).long()]


def _quantizer(fmt: str):
    f = FORMATS[fmt]

    def quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
        """w [out, in] float32 -> fp8 codes [out, in] and a float32 scale per row (amax / max)."""
        amax = w.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / f.max, torch.ones_like(amax))
        codes = encode(w / scale[:, None], fmt, saturate=True)
        return {"weight": codes.view(f.dtype), "weight_scale": scale}

    def dequantize(data: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        return decode(data["weight"], fmt) * data["weight_scale"][:, None]

    def layout(out: int, inp: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {"weight": (f.dtype, (out, inp)), "weight_scale": (torch.float32, (out,))}

    return quantize, dequantize, layout
