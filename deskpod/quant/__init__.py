"""Low-precision weights: FP8, NVFP4, MXFP4, int4/int8 group schemes, and a quantized linear layer.

The names below load on first use: `deskpod quantize` registers its CLI from this package, and
`deskpod --help` must not import torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deskpod.quant.linear import QuantLinear
    from deskpod.quant.tensor import SCHEMES, QuantizedTensor, Scheme, get_scheme, quantize

# public name -> module that defines it
_EXPORTS = {
    "QuantLinear": "deskpod.quant.linear",
    "SCHEMES": "deskpod.quant.tensor",
    "QuantizedTensor": "deskpod.quant.tensor",
    "Scheme": "deskpod.quant.tensor",
    "get_scheme": "deskpod.quant.tensor",
    "quantize": "deskpod.quant.tensor",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'deskpod.quant' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
