"""FP8 codec: bit-exact against torch's casts over every bf16 input, and the per-row fp8 schemes."""

from __future__ import annotations

import pytest
import torch

from deskpod.quant import fp8, quantize

ALL_BF16 = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
FORMATS = list(fp8.FORMATS)


@pytest.mark.parametrize("fmt", FORMATS)
def test_encode_matches_torch_cast_on_every_bf16(fmt: str) -> None:
    want = ALL_BF16.to(fp8.FORMATS[fmt].dtype).view(torch.uint8)
    got = fp8.encode(ALL_BF16, fmt)
    bad = (got != want).nonzero().flatten()
    assert bad.numel() == 0, [(ALL_BF16[i].item(), hex(want[i]), hex(got[i])) for i in bad[:5]]


@pytest.mark.parametrize("fmt", FORMATS)
def test_encode_matches_torch_cast_on_float32_incl_subnormals_and_ties(fmt: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g) * torch.exp2(torch.randint(-40, 40, (200_000,), generator=g).float())
    # exact midpoints between neighbouring fp8 values exercise ties-to-even (the bf16 sweep hits few)
    table = fp8.TABLES[fmt]
    finite = table[torch.isfinite(table)].unique()
    mids = (finite[1:] + finite[:-1]) / 2
    x = torch.cat([x, mids, -mids])
    assert torch.equal(fp8.encode(x, fmt), x.to(fp8.FORMATS[fmt].dtype).view(torch.uint8))


@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_table_matches_torch_for_all_256_codes(fmt: str) -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    got, want = fp8.decode(codes, fmt), codes.view(fp8.FORMATS[fmt].dtype).float()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))
    assert torch.equal(got.signbit(), want.signbit())  # -0.0 at 0x80


def test_format_limits_and_specials() -> None:
    e4 = fp8.decode(torch.tensor([0x7E, 0x7F, 0x80, 0x01], dtype=torch.uint8), "e4m3fn")
    assert e4[0] == 448 and e4[1].isnan() and e4[2] == 0 and e4[2].signbit() and e4[3] == 2.0**-9
    e5 = fp8.decode(torch.tensor([0x7B, 0x7C, 0x7D, 0x01], dtype=torch.uint8), "e5m2")
    assert e5[0] == 57344 and e5[1] == torch.inf and e5[2].isnan() and e5[3] == 2.0**-16
    # E4M3FN has no inf: torch saturates inf to the largest finite value, NaN stays NaN
    specials = torch.tensor([torch.inf, -torch.inf, torch.nan, 1e6])
    assert fp8.encode(specials, "e4m3fn").tolist() == [0x7E, 0xFE, 0x7F, 0x7E]
    assert fp8.encode(specials, "e5m2").tolist() == [0x7C, 0xFC, 0x7F, 0x7C]


@pytest.mark.parametrize("fmt", FORMATS)
def test_saturating_encode_clamps_to_the_largest_finite_value(fmt: str) -> None:
    top = fp8.FORMATS[fmt].max
    x = torch.tensor([top * 1.2, -top * 1.2, torch.inf, -torch.inf, 1e30])
    assert fp8.decode(fp8.encode(x, fmt, saturate=True), fmt).tolist() == [top, -top, top, -top, top]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_value_round_trips(fmt: str) -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    values = fp8.decode(codes, fmt)
    keep = ~values.isnan()
    assert torch.equal(fp8.encode(values[keep], fmt), codes[keep])


@pytest.mark.parametrize(("scheme", "fmt"), [("fp8", "e4m3fn"), ("fp8_e5m2", "e5m2")])
def test_fp8_scheme_scales_each_row_to_the_format_max(scheme: str, fmt: str) -> None:
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(1)) * torch.tensor([1e-3, 1, 10, 1e3, 5, 0])[:, None]
    # row 5 is all zeros: scale 1, codes 0, no NaN
    qt = quantize(w, scheme)
    top = fp8.FORMATS[fmt].max
    amax = w.abs().amax(dim=1)
    assert torch.equal(qt.data["weight_scale"][:5], amax[:5] / top) and qt.data["weight_scale"][5] == 1
    assert qt.data["weight"].dtype == fp8.FORMATS[fmt].dtype
    codes = qt.data["weight"].view(torch.uint8).float()
    # each row's amax lands on the format's largest magnitude
    assert torch.equal(fp8.decode(qt.data["weight"], fmt).abs().amax(dim=1)[:5], torch.full((5,), top))
    assert torch.equal(codes[5], w[5].signbit().float() * 0x80)  # zeros keep their sign
    assert qt.dequantize()[5].eq(0).all()
    # the codes are the rounded scaled weights: re-encoding the dequantized weight changes nothing
    requant = fp8.encode(qt.dequantize() / qt.data["weight_scale"][:, None], fmt, saturate=True)
    assert torch.equal(requant, qt.data["weight"].view(torch.uint8))
    rel = (qt.dequantize() - w).abs() / amax.clamp_min(1e-30)[:, None]
    assert rel.max() <= 2.0 ** -(fp8.FORMATS[fmt].mbits + 1)
