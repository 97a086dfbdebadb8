"""The linear layer every model uses, y = x @ W^T (+ b), with W in whichever weight format it was stored.

`Linear` holds a bias and a `LinearWeight`: the weight in one format, whose buffers are exactly what stays
resident (summing them gives resident weight memory) and whose `apply` multiplies by it:

    DenseWeight     a float tensor: float32 on the CPU, the model's dtype on a GPU
    BlockWeight     ggml's block types (Q4_0 ... Q6_K) kept as stored, run by deskpod's CPU kernels (deskpod.quant.ggml)
    SchemeWeight    a QuantizedTensor (fp8, nvfp4, mxfp4, int4, int8): CPU kernels, Triton on CUDA, or a
                    reference path that expands a few rows at a time
    ConcatWeight    several of those side by side, for fused projections whose parts cannot be stacked

`build_weight(tensors, ...)` picks the format from how the tensors are stored (FORMATS, tried in order),
stacking the rows of several tensors (q, k and v; gate and up) into one weight where their format allows.
"""

from __future__ import annotations

import copy
import functools
import importlib
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deskpod.errors import CorruptModel
from deskpod.formats.weights import BlockTensor, SchemeTensor, StoredTensor
from deskpod.quant.tensor import QuantizedTensor

log = logging.getLogger(__name__)

# the reference path expands at most this many weights at once (16 MiB of float32)
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class WeightOptions:
    """How weights are held: compact (kept in their stored format where a kernel runs it) or expanded to
    float (the reference the correctness tests compare with); on which device, floats in which dtype."""

    compact: bool = True
    device: str = "cpu"
    dtype: torch.dtype = torch.float32


class LinearWeight(nn.Module):
    """A weight [out_features, in_features] in one format. `apply(x)`: x [..., in] -> [..., out]."""

    out_features: int
    in_features: int

    def apply(self, x: torch.Tensor) -> torch.Tensor:  # noqa: A003 - the format's one operation
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x)

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 [out, in]."""
        raise NotImplementedError

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` [T] as float32 [T, in]: the embedding lookup of a token table held as a weight."""
        return self.take_rows(ids).dequantize()

    def take_rows(self, ids: torch.Tensor) -> LinearWeight:
        """The same format over rows `ids` only: every per-row buffer (first dimension out_features) indexed."""
        part = copy.copy(self)
        part._buffers = dict(self._buffers)
        part._modules = {k: m.take_rows(ids) if isinstance(m, LinearWeight) else _rows_of(m, ids, self.out_features)
                         for k, m in self._modules.items()}
        for name, buffer in self._buffers.items():
            if buffer is not None and buffer.dim() and buffer.shape[0] == self.out_features:
                part._buffers[name] = buffer[ids]
        part.out_features = len(ids)
        return part


def _rows_of(module: nn.Module, ids: torch.Tensor, rows: int) -> nn.Module:
    part = copy.copy(module)
    part._buffers = {k: b[ids] if b is not None and b.dim() and b.shape[0] == rows else b for k, b in module._buffers.items()}
    if hasattr(part, "out_features"):
        part.out_features = len(ids)
    return part


class Linear(nn.Module):
    """y = x @ W^T (+ bias); W is `weight`, in its own format."""

    def __init__(self, weight: LinearWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.out_features, weight.in_features
        self.register_buffer("bias", bias)  # [out] float, or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.weight.apply(x)  # a plain call: the module's hooks are not needed here
        return y if self.bias is None else y + self.bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.rows(ids)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# --- float --------------------------------------------------------------------------------------------


class DenseWeight(LinearWeight):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # [out, in]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).float()


class ConcatWeight(LinearWeight):
    """Several weights side by side (their outputs concatenated): a fused projection whose parts differ in
    format, or in a per-tensor scale that stacking would have to share."""

    def __init__(self, parts: Sequence[LinearWeight]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.out_features, self.in_features = sum(p.out_features for p in parts), parts[0].in_features

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.apply(x) for p in self.parts], dim=-1)

    def dequantize(self) -> torch.Tensor:
        return torch.cat([p.dequantize() for p in self.parts])


# --- deskpod's quantization schemes -------------------------------------------------------------------


def _cpu_kernel(qt: QuantizedTensor) -> nn.Module | None:
    """deskpod.quant.cpu.cpu_weights(qt) when that module exists; None otherwise."""
    try:
        cpu = importlib.import_module("deskpod.quant.cpu")
    except ModuleNotFoundError as e:
        if e.name != "deskpod.quant.cpu":
            raise
        return None
    return cpu.cpu_weights(qt)


@functools.cache
def _triton():
    """The Triton kernels module, or None where triton is not installed (then CUDA uses the reference path)."""
    try:
        from deskpod.quant.kernels import triton_lowbit
    except ImportError as e:
        log.warning("deskpod: Triton unavailable (%s): quantized layers on CUDA dequantize row chunks instead", e)
        return None
    return triton_lowbit


def reference_matmul(x: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """x [M, in] @ dequantize(qt)^T -> [M, out] in float32, expanding the weight in row chunks."""
    out, inp = qt.shape
    step = max(1, CHUNK_ELEMENTS // max(inp, 1))
    x = x.float()
    return torch.cat([x @ qt.rows(r, r + step).dequantize().T for r in range(0, out, step)], dim=1)


class SchemeWeight(LinearWeight):
    """A QuantizedTensor weight [out, in]: on the CPU the kernels of deskpod.quant.cpu (which keep their own,
    repacked buffers), on CUDA the fused Triton kernel, elsewhere the reference path."""

    def __init__(self, qt: QuantizedTensor):
        super().__init__()
        self.scheme, self.in_features, self.out_features = qt.scheme, qt.shape[1], qt.shape[0]
        self.kernel = _cpu_kernel(qt) if qt.data["weight"].device.type == "cpu" else None
        self._names = [] if self.kernel is not None else list(qt.data)
        for name in self._names:  # when the CPU kernel holds (repacked) weights, don't keep a second copy
            self.register_buffer(name, qt.data[name])

    @property
    def qt(self) -> QuantizedTensor | None:
        """The weight as a QuantizedTensor over this module's buffers; None when a CPU kernel holds it."""
        if self.kernel is not None:
            return None
        data = {n: getattr(self, n) for n in self._names}
        return QuantizedTensor(self.scheme, (self.out_features, self.in_features), data)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        if self.kernel is not None and x.dtype == torch.float32 and x.device.type == "cpu":
            return self.kernel(x)  # the engine's decode step: no reshapes or casts around the kernel
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.kernel is not None:
            if x2.device.type != "cpu":
                raise ValueError(
                    "this SchemeWeight holds CPU kernel weights; build it from qt.to(device) to run on "
                    f"{x2.device}, not by moving the module"
                )
            y = self.kernel(x2.float())
        elif x2.is_cuda and _triton() is not None:
            y = _triton().matmul(x2, self.qt)
        else:
            y = reference_matmul(x2, self.qt)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def dequantize(self) -> torch.Tensor:
        return self.kernel.dequantize() if self.kernel is not None else self.qt.dequantize(torch.float32)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


def QuantLinear(qt: QuantizedTensor, bias: torch.Tensor | None = None) -> Linear:  # noqa: N802 - the public name
    """A Linear over a QuantizedTensor weight (`deskpod.quant.QuantLinear(quantize(w, "nvfp4"))(x)`)."""
    return Linear(SchemeWeight(qt), bias)


def quantized_tensor(tensors: Sequence[SchemeTensor], in_features: int) -> QuantizedTensor | None:
    """The tensors' rows stacked into one QuantizedTensor; None when they cannot be (different schemes, or
    per-tensor scales that differ: stacking would have to share one)."""
    if len({t.dtype for t in tensors}) > 1:
        return None
    parts = [t.parts() for t in tensors]
    if len({tuple(sorted(p)) for p in parts}) > 1:
        return None
    stacked = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        if values[0].dim() == 0:
            if any(not torch.equal(v, values[0]) for v in values):
                return None
            stacked[f"w.{key}"] = values[0]
        else:
            stacked[f"w.{key}"] = torch.cat(values)
    rows = sum(t.rows for t in tensors)
    try:
        return QuantizedTensor.from_state_dict(tensors[0].dtype, (rows, in_features), stacked, "w")
    except ValueError as e:
        names = ", ".join(t.name for t in tensors)
        raise CorruptModel(f"{names}: {str(e).replace('w.', '')}") from None


def _scheme_weight(tensors: Sequence[StoredTensor], in_features: int, options: WeightOptions) -> LinearWeight | None:
    if not all(isinstance(t, SchemeTensor) for t in tensors):
        return None
    qt = quantized_tensor(tensors, in_features)
    if qt is None:
        return None
    if not options.compact:
        return DenseWeight(qt.dequantize(options.dtype).to(options.device))
    if options.device == "cpu" and options.dtype == torch.float32 and qt.shape[1] % 32 == 0:
        from deskpod.quant.cpu import gguf_blocks

        if (blocks := gguf_blocks(qt)) is not None:  # int4, int8, mxfp4, nvfp4: run as a GGUF is
            return blocks
    return SchemeWeight(qt.to(options.device))


def _float_values(t: StoredTensor, in_features: int) -> torch.Tensor:
    if isinstance(t, SchemeTensor):
        qt = quantized_tensor([t], in_features)
        if qt is None:
            raise CorruptModel(f"{t.name}: its parts do not form one {t.dtype} weight")
        return qt.dequantize(torch.float32)
    return t.float()


def _dense_weight(tensors: Sequence[StoredTensor], in_features: int, options: WeightOptions) -> LinearWeight:
    values = torch.cat([_float_values(t, in_features).reshape(t.rows, -1) for t in tensors])
    return DenseWeight(values.to(device=options.device, dtype=options.dtype))


def _ggml_weight(tensors: Sequence[StoredTensor], in_features: int, options: WeightOptions) -> LinearWeight | None:
    if not options.compact or options.device != "cpu":
        return None
    from deskpod.quant.ggml import compact_weight

    return compact_weight(tensors)


# Formats that hold several tensors as one weight when they can, tried in order; dense always can.
FORMATS: tuple[Callable[[Sequence[StoredTensor], int, WeightOptions], LinearWeight | None], ...] = (
    _ggml_weight, _scheme_weight,
)


def build_weight(tensors: Sequence[StoredTensor], shape: tuple[int, int], options: WeightOptions) -> LinearWeight:
    """One weight whose rows are the tensors' stacked, checked against the model's `shape` [out, in]:
    CorruptModel naming the tensors when the file's tensors do not have the shape its config implies."""
    weight = next((w for make in FORMATS if (w := make(tensors, shape[1], options)) is not None), None)
    if weight is None and len(tensors) > 1:  # parts in different formats: each run of one format together
        runs = [list(run) for _, run in itertools.groupby(tensors, key=lambda t: (type(t), t.dtype))]
        runs = runs if len(runs) > 1 else [[t] for t in tensors]  # one format, but parts that cannot be stacked
        parts = [build_weight(run, (sum(t.rows for t in run), shape[1]), options) for run in runs]
        dense = all(isinstance(p, DenseWeight) for p in parts)
        weight = DenseWeight(torch.cat([p.weight for p in parts])) if dense else ConcatWeight(parts)
    weight = weight or _dense_weight(tensors, shape[1], options)
    if (weight.out_features, weight.in_features) != tuple(shape):
        names = ", ".join(f"{t.name} {list(t.shape)}" for t in tensors)
        raise CorruptModel(f"{names}: the model's config implies a weight of {list(shape)} for them")
    return weight


def resident_bytes(tensor: StoredTensor, options: WeightOptions) -> int:
    """The bytes `tensor` takes once loaded with `options`, by the rules build_weight follows: known from the
    file's header before any weight is read (admission control plans with it)."""
    if isinstance(tensor, SchemeTensor):
        if options.compact:
            return tensor.nbytes
        return tensor.rows * _scheme_columns(tensor) * options.dtype.itemsize
    if options.compact and options.device == "cpu" and isinstance(tensor, BlockTensor):
        from deskpod.quant.ggml import compact_bytes

        compact = compact_bytes(tensor)
        if compact is not None:
            return compact
    return tensor.n_elements * options.dtype.itemsize


def _scheme_columns(tensor: SchemeTensor) -> int:
    """The weight's input width from its stored codes' (two 4-bit codes a byte in the packed schemes)."""
    from deskpod.quant.tensor import get_scheme

    codes_per_row = get_scheme(tensor.dtype).layout(1, 32)["weight"][1][-1]
    return tensor.shape[1] * (32 // codes_per_row)
