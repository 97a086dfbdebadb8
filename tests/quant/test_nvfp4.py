"""NVFP4: NVIDIA's two-level scaling (FP32 per tensor, E4M3 per 16), E2M1 elements."""

from __future__ import annotations

import torch

from deskpod.quant import fp4, fp8, quantize


def _weight(out: int = 8, inp: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * torch.exp2(torch.randint(-6, 6, (out, 1), generator=g).float())


def test_tensor_and_block_scales_follow_the_recipe() -> None:
    w = _weight()
    qt = quantize(w, "nvfp4")
    scale_2 = qt.data["weight_scale_2"]
    assert scale_2.dtype == torch.float32 and scale_2.dim() == 0
    assert scale_2 == w.abs().amax() / (6 * 448)
    block_amax = w.reshape(8, 4, 16).abs().amax(-1)
    want = (block_amax / 6 / scale_2).to(torch.float8_e4m3fn)  # torch's own cast as the reference
    assert torch.equal(qt.data["weight_scale"].view(torch.uint8), want.view(torch.uint8))
    # the block holding the tensor's amax gets the largest E4M3 scale and that element code ±6
    r, c = divmod(int(w.abs().argmax()), 64)
    assert fp8.decode(qt.data["weight_scale"][r, c // 16], "e4m3fn") == 448
    assert fp4.unpack_nibbles(qt.data["weight"], 64)[r, c] & 7 == 7  # magnitude code of 6


def test_elements_are_the_nearest_representable_values() -> None:
    w = _weight(seed=1)
    qt = quantize(w, "nvfp4")
    scale = fp8.decode(qt.data["weight_scale"], "e4m3fn").repeat_interleave(16, 1)
    grid = torch.tensor(fp4.E2M1_VALUES) * scale[..., None] * qt.data["weight_scale_2"]  # [out, in, 16] candidates
    best = (grid - w[..., None]).abs().amin(-1)
    assert torch.equal((qt.dequantize() - w).abs(), best)


def test_layout_and_packing() -> None:
    qt = quantize(_weight(3, 37), "nvfp4")
    assert qt.data["weight"].shape == (3, 19) and qt.data["weight"].dtype == torch.uint8
    assert qt.data["weight_scale"].shape == (3, 3) and qt.data["weight_scale"].dtype == torch.float8_e4m3fn
    codes = fp4.unpack_nibbles(qt.data["weight"], 38)
    assert codes[:, 37].eq(0).all()  # the padding code of the odd last byte
    values = fp4.decode_e2m1(codes[:, :37])
    scale = fp8.decode(qt.data["weight_scale"], "e4m3fn").repeat_interleave(16, 1)[:, :37]
    assert torch.equal(qt.dequantize(), values * scale * qt.data["weight_scale_2"])


def test_zero_tensor_and_underflowing_blocks_give_zeros_not_nan() -> None:
    assert quantize(torch.zeros(2, 32), "nvfp4").dequantize().eq(0).all()
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 16] = 1000.0, 1e-9  # second block's scale underflows E4M3: its elements become 0
    qt = quantize(w, "nvfp4")
    out = qt.dequantize()
    assert out[0, 0] == 1000.0 and out[0, 16] == 0 and not out.isnan().any()


def test_bits_per_weight_is_four_and_a_half() -> None:
    qt = quantize(_weight(256, 1024), "nvfp4")
    assert qt.bits_per_weight == 4 + 8 / 16 + 32 / (256 * 1024)


def test_quality_beats_mxfp4_on_gaussian_weights() -> None:
    w = _weight(64, 512, seed=3)
    err = {s: float((quantize(w, s).dequantize() - w).norm() / w.norm()) for s in ("nvfp4", "mxfp4")}
    assert err["nvfp4"] < err["mxfp4"] < 0.2


