"""MXFP4 per OCP MX v1.0: E8M0 shared scale floor(log2(amax)) - 2, saturating E2M1 elements; and the
gguf package's MXFP4 as an independent reference (its block layout differs, so values are compared)."""

from __future__ import annotations

import gguf
import ml_dtypes
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from deskpod.quant import fp4, mxfp4, quantize


def _weight(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * torch.exp2(torch.randint(-20, 20, (out, 1), generator=g).float())


def test_matches_gguf_values_and_scales() -> None:
    w = _weight(64, 256)
    raw = gguf_quantize(w.numpy(), gguf.GGMLQuantizationType.MXFP4)
    want = torch.from_numpy(gguf_dequantize(raw, gguf.GGMLQuantizationType.MXFP4))
    qt = quantize(w, "mxfp4")
    assert torch.equal(qt.dequantize(), want)
    # gguf's block: 1 byte E8M0, then 16 bytes of nibbles (elements j and j+16 share a byte)
    gguf_scales = torch.from_numpy(np.ascontiguousarray(raw)).reshape(64, 8, 17)[..., 0]
    assert torch.equal(qt.data["weight_scale"], gguf_scales)


@pytest.mark.parametrize("k", [-130, -126, -3, 0, 1, 7, 100, 125])
def test_shared_exponent_is_floor_log2_amax_minus_two(k: int) -> None:
    top = torch.tensor(2.0**k)
    for amax in (top, torch.nextafter(top, top * 2), torch.nextafter(top, torch.tensor(0.0))):
        block = torch.zeros(1, 32)
        block[0, 3] = -amax
        _, scale = mxfp4.encode_blocks(block)
        e = int(np.floor(np.log2(np.float64(amax)))) - 2  # float64 log2 is exact enough here
        assert scale.item() == max(e, -127) + 127, float(amax)


def test_the_block_maximum_saturates_to_six() -> None:
    block = torch.tensor([[7.5, 7.9, -7.99, 6.9, 5.0, 3.5, 0.25] + [0.0] * 25])
    codes, scale = mxfp4.encode_blocks(block)
    assert scale.item() == 127  # floor(log2(7.99)) - 2 = 0: X = 1
    # 7.5/7.9/7.99/6.9 clamp to 6; 5.0 and 3.5 and 0.25 are ties, rounded to even (4, 4, 0)
    assert fp4.decode_e2m1(codes[0, :7]).tolist() == [6.0, 6.0, -6.0, 6.0, 4.0, 4.0, 0.0]


def test_zero_block_gets_the_smallest_scale_and_zeros() -> None:
    codes, scale = mxfp4.encode_blocks(torch.zeros(2, 32))
    assert scale.tolist() == [0, 0] and codes.eq(0).all()
    assert quantize(torch.zeros(3, 40), "mxfp4").dequantize().eq(0).all()


@pytest.mark.parametrize("bad", [torch.nan, torch.inf, -torch.inf])
def test_non_finite_element_makes_the_block_nan(bad: float) -> None:
    blocks = torch.ones(2, 32)
    blocks[1, 5] = bad
    codes, scale = mxfp4.encode_blocks(blocks)
    assert scale.tolist() == [127 - 2, mxfp4.E8M0_NAN]
    data = {"weight": fp4.pack_nibbles(codes), "weight_scale": scale[:, None]}
    out = mxfp4.dequantize(data, (2, 32))
    assert out[1].isnan().all() and out[0].eq(1).all()


def test_e8m0_decode() -> None:
    got = mxfp4.decode_scale(torch.tensor([0, 1, 126, 127, 128, 254, 255], dtype=torch.uint8))
    assert got[:6].tolist() == [2.0**-127, 2.0**-126, 0.5, 1.0, 2.0, 2.0**127] and got[6].isnan()
    # all 256 codes against ml_dtypes' float8_e8m0fnu
    codes = np.arange(256, dtype=np.uint8)
    want = torch.from_numpy(codes.view(ml_dtypes.float8_e8m0fnu).astype(np.float32))
    got = mxfp4.decode_scale(torch.from_numpy(codes))
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(0), want.nan_to_num(0))
    if hasattr(torch, "float8_e8m0fnu"):  # and torch's own E8M0 dtype
        want = torch.from_numpy(codes).view(torch.float8_e8m0fnu).float()
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(0), want.nan_to_num(0))


def test_ragged_width_and_bits_per_weight() -> None:
    w = _weight(5, 45, seed=2)
    qt = quantize(w, "mxfp4")
    assert qt.data["weight"].shape == (5, 23) and qt.data["weight_scale"].shape == (5, 2)
    padded = torch.nn.functional.pad(w, (0, 64 - 45))
    assert torch.equal(qt.dequantize(), quantize(padded, "mxfp4").dequantize()[:, :45])
    assert quantize(_weight(16, 1024), "mxfp4").bits_per_weight == 4.25
