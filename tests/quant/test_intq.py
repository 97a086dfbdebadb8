"""int4 (asymmetric, scale + min per 32) and int8 (symmetric, scale per 32) group schemes."""

from __future__ import annotations

import pytest
import torch

from deskpod.quant import fp4, quantize


def _weight(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def test_int4_codes_span_each_group_and_round_to_nearest() -> None:
    w = _weight(4, 96)
    qt = quantize(w, "int4")
    scale, mn = qt.data["weight_scale"].float(), qt.data["weight_min"].float()
    assert qt.data["weight_scale"].dtype == qt.data["weight_min"].dtype == torch.float16
    assert torch.equal(mn, w.reshape(4, 3, 32).amin(-1).half().float())
    q = fp4.unpack_nibbles(qt.data["weight"], 96).reshape(4, 3, 32)
    assert q.amin(-1).eq(0).all() and q.amax(-1).eq(15).all()
    err = (qt.dequantize() - w).abs().reshape(4, 3, 32)
    # half a step, plus the float16 rounding of min and scale
    assert (err <= scale[..., None] / 2 + 1e-3 * w.abs().amax()).all()


def test_int4_padding_does_not_widen_the_last_group() -> None:
    w = torch.linspace(1.0, 2.0, 5)[None, :]  # one group of 5 real columns, 27 padding
    qt = quantize(w, "int4")
    assert qt.data["weight_min"].item() == 1.0 and qt.data["weight_scale"].float().item() == pytest.approx(1 / 15, rel=1e-3)
    assert torch.allclose(qt.dequantize(), w, atol=1 / 30)
    assert qt.dequantize().shape == (1, 5)


def test_int8_symmetric_codes() -> None:
    w = _weight(3, 70, seed=1)
    qt = quantize(w, "int8")
    q, scale = qt.data["weight"], qt.data["weight_scale"].float()
    assert q.dtype == torch.int8 and q.shape == (3, 70) and scale.shape == (3, 3)
    assert q.abs().max() == 127 and q.min() >= -127
    step = scale.repeat_interleave(32, 1)[:, :70]
    assert ((qt.dequantize() - w).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(qt.dequantize(), q.float() * step)


def test_constant_and_zero_groups() -> None:
    w = torch.zeros(2, 32)
    w[1] = 0.75
    assert torch.equal(quantize(w, "int4").dequantize(), w)  # scale 0, min 0.75: exact
    int8 = quantize(w, "int8")
    assert int8.data["weight_scale"][0].item() == 0 and int8.dequantize()[0].eq(0).all()
    assert torch.allclose(int8.dequantize()[1], w[1], atol=0.75 / 254)


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_weights_beyond_float16_scales_are_refused(scheme: str) -> None:
    with pytest.raises(ValueError, match="too large for float16"):
        quantize(torch.full((1, 32), 1e12), scheme)


@pytest.mark.parametrize(("scheme", "bits"), [("int4", 5.0), ("int8", 8.5)])
def test_bits_per_weight(scheme: str, bits: float) -> None:
    assert quantize(_weight(8, 256), scheme).bits_per_weight == bits
