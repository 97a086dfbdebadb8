"""The public API: SCHEMES, quantize() and its errors, QuantizedTensor's layout, bits and state dict."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from deskpod.quant import SCHEMES, QuantizedTensor, quantize

SHAPES = [(16, 64), (7, 45), (1, 1), (3, 17)]


def _weight(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_unknown_scheme_lists_the_schemes() -> None:
    with pytest.raises(ValueError, match="unknown quantization scheme 'fp3'") as e:
        quantize(_weight((2, 32)), "fp3")
    for name in ("fp8", "fp8_e5m2", "nvfp4", "mxfp4", "int4", "int8"):
        assert name in str(e.value)
    assert set(SCHEMES) == {"fp8", "fp8_e5m2", "nvfp4", "mxfp4", "int4", "int8"}


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize(("bad", "word"), [(torch.nan, "NaN"), (torch.inf, "inf"), (-torch.inf, "inf")])
def test_non_finite_weights_are_refused(scheme: str, bad: float, word: str) -> None:
    w = _weight((4, 40))
    w[2, 33] = bad
    with pytest.raises(ValueError, match=f"contains {word}"):
        quantize(w, scheme)


@pytest.mark.parametrize(
    ("weight", "match"),
    [
        (torch.zeros(4, 4, 4), "2-D"),
        (torch.zeros(0, 32), "non-empty"),
        (torch.zeros(4, 32, dtype=torch.int32), "float32/bfloat16/float16"),
        (torch.zeros(4, 32).to(torch.float8_e4m3fn), "already low-precision"),
    ],
)
def test_bad_weights_are_refused(weight: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        quantize(weight, "nvfp4")


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("shape", SHAPES)
def test_data_follows_the_layout_and_dequantizes_to_shape(scheme: str, shape: tuple[int, int]) -> None:
    qt = quantize(_weight(shape), scheme)
    layout = SCHEMES[scheme].layout(*shape)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in qt.data.items()} == layout
    out = qt.dequantize()
    assert out.shape == shape and out.dtype == torch.float32 and out.isfinite().all()
    assert qt.dequantize(torch.bfloat16).dtype == torch.bfloat16


# expected bits per weight for a [128, 512] weight: codes + every scale tensor
BITS = {
    "fp8": 8 + 32 / 512,
    "fp8_e5m2": 8 + 32 / 512,
    "nvfp4": 4 + 8 / 16 + 32 / (128 * 512),
    "mxfp4": 4 + 8 / 32,
    "int4": 4 + 16 / 32 + 16 / 32,
    "int8": 8 + 16 / 32,
}


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_bits_per_weight_counts_every_stored_tensor(scheme: str) -> None:
    qt = quantize(_weight((128, 512)), scheme)
    assert qt.bits_per_weight == BITS[scheme]
    assert qt.nbytes == sum(t.numel() * t.element_size() for t in qt.data.values())


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_half_precision_inputs_quantize_like_their_float32_values(scheme: str) -> None:
    w = _weight((8, 64)).to(torch.bfloat16)
    a, b = quantize(w, scheme), quantize(w.float(), scheme)
    assert all(torch.equal(a.data[k].view(torch.uint8), b.data[k].view(torch.uint8)) for k in a.data if a.data[k].dim())


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_state_dict_round_trips_through_safetensors(scheme: str, tmp_path) -> None:
    qt = quantize(_weight((9, 50)), scheme)
    sd = qt.state_dict("model.layers.0.mlp.up_proj")
    assert set(sd) == {f"model.layers.0.mlp.up_proj.{k}" for k in qt.data}
    save_file(sd, tmp_path / "w.safetensors")
    back = QuantizedTensor.from_state_dict(scheme, (9, 50), load_file(tmp_path / "w.safetensors"), "model.layers.0.mlp.up_proj")
    assert torch.equal(back.dequantize(), qt.dequantize())


def test_from_state_dict_names_the_bad_tensor() -> None:
    sd = quantize(_weight((4, 32)), "nvfp4").state_dict("p")
    missing = {k: v for k, v in sd.items() if k != "p.weight_scale_2"}
    with pytest.raises(ValueError, match=r"p\.weight_scale_2 is missing"):
        QuantizedTensor.from_state_dict("nvfp4", (4, 32), missing, "p")
    wrong = dict(sd, **{"p.weight_scale": sd["p.weight_scale"].float()})
    with pytest.raises(ValueError, match=r"p\.weight_scale is torch.float32 \[4, 2\].*needs torch.float8_e4m3fn"):
        QuantizedTensor.from_state_dict("nvfp4", (4, 32), wrong, "p")
    with pytest.raises(ValueError, match=r"p\.weight is torch.uint8 \[4, 16\]; a nvfp4 weight \[4, 40\]"):
        QuantizedTensor.from_state_dict("nvfp4", (4, 40), sd, "p")


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_rows_and_to(scheme: str) -> None:
    qt = quantize(_weight((10, 40)), scheme)
    part = qt.rows(3, 7)
    assert part.shape == (4, 40) and torch.equal(part.dequantize(), qt.dequantize()[3:7])
    assert torch.equal(qt.to("cpu").dequantize(), qt.dequantize())
