"""Low-precision weights: FP8, NVFP4, MXFP4, int4/int8 group schemes, and a quantized linear layer."""

from deskpod.quant.linear import QuantLinear
from deskpod.quant.tensor import SCHEMES, QuantizedTensor, Scheme, get_scheme, quantize

__all__ = ["SCHEMES", "QuantLinear", "QuantizedTensor", "Scheme", "get_scheme", "quantize"]
