"""The public quantization API: the SCHEMES table, quantize(), and QuantizedTensor.

A QuantizedTensor is a 2-D weight [out, in] stored as a few plain tensors named as in NVIDIA ModelOpt's
Hugging Face checkpoints (weight / weight_scale / weight_scale_2 / weight_min); the same dict is the
in-memory form and the safetensors form, so saving and loading is a rename with a prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from deskpod.quant import fp8, intq, mxfp4, nvfp4

Data = dict[str, torch.Tensor]
Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]


@dataclass(frozen=True)
class Scheme:
    """One storage format: how to encode a float32 [out, in] weight, decode it, and what it stores."""

    name: str
    block: int  # columns sharing one scale (0: one scale per row)
    encode: Callable[[torch.Tensor], Data]
    decode: Callable[[Data, tuple[int, int]], torch.Tensor]
    layout: Callable[[int, int], Layout]  # (out, in) -> {name: (dtype, shape)}
    description: str


def _fp8(name: str, fmt: str, description: str) -> Scheme:
    encode, decode, layout = fp8._quantizer(fmt)
    return Scheme(name, 0, encode, decode, layout, description)


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        _fp8("fp8", "e4m3fn", "FP8 E4M3FN, float32 scale per output row"),
        _fp8("fp8_e5m2", "e5m2", "FP8 E5M2, float32 scale per output row"),
        Scheme("nvfp4", nvfp4.BLOCK, nvfp4.quantize, nvfp4.dequantize, nvfp4.layout,
               "E2M1, E4M3 scale per 16, float32 scale per tensor (NVIDIA)"),
        Scheme("mxfp4", mxfp4.BLOCK, mxfp4.quantize, mxfp4.dequantize, mxfp4.layout,
               "E2M1, E8M0 scale per 32 (OCP MX v1.0)"),
        Scheme("int4", intq.GROUP, intq.quantize_int4, intq.dequantize_int4, intq.layout_int4,
               "4-bit asymmetric, float16 scale and min per 32"),
        Scheme("int8", intq.GROUP, intq.quantize_int8, intq.dequantize_int8, intq.layout_int8,
               "int8 symmetric, float16 scale per 32"),
    )
}


def get_scheme(name: str) -> Scheme:
    """The Scheme called `name`; ValueError listing the known schemes otherwise."""
    if name not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {name!r}; known schemes: {', '.join(SCHEMES)}")
    return SCHEMES[name]


@dataclass(frozen=True)
class QuantizedTensor:
    """A quantized 2-D weight: `data` holds the tensors of `scheme`'s layout for a weight of `shape`."""

    scheme: str
    shape: tuple[int, int]
    data: Data

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] the codes and scales stand for, in `dtype`."""
        return get_scheme(self.scheme).decode(self.data, self.shape).to(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor (codes and all scales)."""
        return sum(t.numel() * t.element_size() for t in self.data.values())

    @property
    def bits_per_weight(self) -> float:
        """Storage bits of all stored tensors per element of `shape`."""
        return 8 * self.nbytes / (self.shape[0] * self.shape[1])

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """The same weight with every stored tensor on `device`."""
        return QuantizedTensor(self.scheme, self.shape, {k: v.to(device) for k, v in self.data.items()})

    def rows(self, start: int, stop: int) -> QuantizedTensor:
        """Output rows start:stop, 0 <= start < stop (views; per-tensor scalars are shared)."""
        stop = min(stop, self.shape[0])
        data = {k: v[start:stop] if v.dim() else v for k, v in self.data.items()}
        return QuantizedTensor(self.scheme, (stop - start, self.shape[1]), data)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """{f"{prefix}.weight": ..., f"{prefix}.weight_scale": ..., ...}: the safetensors form."""
        return {f"{prefix}.{k}": v for k, v in self.data.items()}

    @classmethod
    def from_state_dict(
        cls, scheme: str, shape: tuple[int, int], tensors: dict[str, torch.Tensor], prefix: str
    ) -> QuantizedTensor:
        """Pick `prefix`'s tensors out of `tensors`, checking each against the scheme's layout;
        ValueError naming the tensor when one is missing or has the wrong dtype or shape."""
        shape = (int(shape[0]), int(shape[1]))
        data = {}
        for name, (dtype, want) in get_scheme(scheme).layout(*shape).items():
            key = f"{prefix}.{name}"
            if key not in tensors:
                raise ValueError(f"{key} is missing: a {scheme} weight {list(shape)} stores {name}")
            t = tensors[key]
            if t.dtype != dtype or tuple(t.shape) != want:
                raise ValueError(
                    f"{key} is {t.dtype} {list(t.shape)}; a {scheme} weight {list(shape)} needs {dtype} {list(want)}"
                )
            data[name] = t
        return cls(scheme, shape, data)


def quantize(weight: torch.Tensor, scheme: str) -> QuantizedTensor:
    """Quantize a 2-D float weight [out, in] with `scheme` (a key of SCHEMES).

    `in` need not be a multiple of the scheme's block: the last block is padded (codes 0) and
    dequantize() crops. ValueError for an unknown scheme, a non-2-D or non-float weight, or NaN/inf."""
    s = get_scheme(scheme)
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"quantize expects a non-empty 2-D weight [out, in], got shape {list(weight.shape)}")
    if not weight.is_floating_point() or weight.element_size() < 2:
        raise ValueError(
            f"quantize expects a float32/bfloat16/float16 weight, got {weight.dtype} "
            "(an already low-precision weight: quantize from the original model instead)"
        )
    w = weight.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        bad = "NaN" if w.isnan().any() else "inf"
        raise ValueError(f"weight contains {bad} values; cannot quantize a non-finite weight")
    return QuantizedTensor(scheme, (w.shape[0], w.shape[1]), s.encode(w))
