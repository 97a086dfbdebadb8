"""E2M1 against the spec's table of 16 values; ties to even at every midpoint; nibble packing."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from deskpod.quant import fp4

# OCP MX v1.0 table for FP4 E2M1 (sign bit 3, exponent bits 2..1 with bias 1, mantissa bit 0)
SPEC = {
    0b0000: 0.0, 0b0001: 0.5, 0b0010: 1.0, 0b0011: 1.5, 0b0100: 2.0, 0b0101: 3.0, 0b0110: 4.0, 0b0111: 6.0,
    0b1000: -0.0, 0b1001: -0.5, 0b1010: -1.0, 0b1011: -1.5, 0b1100: -2.0, 0b1101: -3.0, 0b1110: -4.0, 0b1111: -6.0,
}


def _spec_value(code: int) -> float:
    """The value from the bit fields, independent of the table above."""
    s, e, m = code >> 3, (code >> 1) & 3, code & 1
    mag = m * 0.5 if e == 0 else (1 + m / 2) * 2.0 ** (e - 1)
    return -mag if s else mag


def test_decode_matches_the_spec_table() -> None:
    got = fp4.decode_e2m1(torch.arange(16, dtype=torch.uint8))
    assert got.tolist() == [SPEC[c] for c in range(16)] == [_spec_value(c) for c in range(16)]
    assert got.signbit().tolist() == [c >= 8 for c in range(16)]  # code 8 is -0.0


def test_every_value_encodes_to_its_code() -> None:
    values = torch.tensor([SPEC[c] for c in range(16)])
    assert fp4.encode_e2m1(values).tolist() == list(range(16))


# every midpoint between neighbouring magnitudes, and the code a tie must round to (the even one)
TIES = [(0.25, 0), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6), (5.0, 6)]


@pytest.mark.parametrize(("mid", "code"), TIES)
def test_ties_round_to_even_and_neighbours_round_to_nearest(mid: float, code: int) -> None:
    x = torch.tensor([mid, -mid])
    assert fp4.encode_e2m1(x).tolist() == [code, code | 8]
    assert code % 2 == 0
    below, above = torch.nextafter(x, torch.zeros(2)), torch.nextafter(x, x * 2)
    lo = fp4.encode_e2m1(below)[0].item()
    assert fp4.encode_e2m1(above)[0].item() == lo + 1
    assert SPEC[lo] < mid < SPEC[lo + 1]


def test_encode_matches_ml_dtypes_on_every_bf16() -> None:
    """ml_dtypes (JAX's numpy float types) casts to float4_e2m1fn with round-to-nearest-even and
    saturation: an independent implementation of the same rules, compared over every non-NaN bf16."""
    x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    x = x[~x.isnan()]
    want = torch.from_numpy(x.numpy().astype(ml_dtypes.float4_e2m1fn).view(np.uint8).copy())
    assert torch.equal(fp4.encode_e2m1(x), want)
    codes = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    assert torch.equal(fp4.decode_e2m1(torch.arange(16, dtype=torch.uint8)), torch.from_numpy(codes))


def test_saturates_to_six_and_keeps_signed_zero() -> None:
    x = torch.tensor([6.0, 6.5, 100.0, 3e38, torch.inf, -7.0, -torch.inf, 0.0, -0.0, -0.1, 1e-30])
    assert fp4.encode_e2m1(x).tolist() == [7, 7, 7, 7, 7, 15, 15, 0, 8, 8, 0]


def test_encode_is_nearest_with_ties_to_even_on_a_dense_grid() -> None:
    grid = [Fraction(i, 64) for i in range(-8 * 64, 8 * 64 + 1)]
    magnitudes = [Fraction(SPEC[c]).limit_denominator() for c in range(8)]

    def expected(x: Fraction) -> int:
        a = abs(x)
        best = min(range(8), key=lambda c: (abs(a - magnitudes[c]), c % 2))  # nearest, then even code
        return best | (8 if x < 0 else 0)

    got = fp4.encode_e2m1(torch.tensor([float(x) for x in grid]))
    assert got.tolist() == [expected(x) for x in grid]


def test_packing_puts_the_even_element_in_the_low_nibble() -> None:
    codes = torch.tensor([[1, 2, 3, 4, 5]], dtype=torch.uint8)
    packed = fp4.pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x43, 0x05]]  # odd length: the last high nibble is padding (0)
    assert torch.equal(fp4.unpack_nibbles(packed, 5), codes)


def test_packing_is_torchs_float4_e2m1fn_x2_layout() -> None:
    """torch 2.13 cannot cast to float4_e2m1fn_x2 on CPU, so its layout is read from the header that
    defines the dtype: val0 (the even element) in bits 3..0, val1 in bits 7..4."""
    header = Path(torch.__file__).parent / "include/torch/headeronly/util/Float4_e2m1fn_x2.h"
    if not hasattr(torch, "float4_e2m1fn_x2") or not header.exists():
        pytest.skip("this torch has no float4_e2m1fn_x2 (or ships no headers) to compare with")
    text = header.read_text()
    assert "val1 : val0" in text and "7654 : 3210" in text
    codes = torch.tensor([[0b0001, 0b1010]], dtype=torch.uint8)  # val0 = 0.5, val1 = -1.0
    assert fp4.pack_nibbles(codes).view(torch.float4_e2m1fn_x2).view(torch.uint8).item() == 0b1010_0001


def test_pack_round_trips_random_codes() -> None:
    codes = torch.randint(0, 16, (7, 33), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fp4.unpack_nibbles(fp4.pack_nibbles(codes), 33), codes)


def test_blocks_pad_and_crop() -> None:
    w = torch.arange(2 * 37, dtype=torch.float32).reshape(2, 37)
    b = fp4.to_blocks(w, 16)
    assert b.shape == (2, 3, 16) and b[:, 2, 5:].eq(0).all()
    assert torch.equal(fp4.from_blocks(b, 37), w)
