"""CPU kernels for quantized weights against the reference: dequantize the stored layout, then F.linear.

The test weights are random codes and scales written straight into the contract's layouts, so every code
value and scale byte the kernels may meet is exercised (not only those a quantizer happens to produce)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from deskpod.quant import QuantizedTensor, ggml, quantize
from deskpod.quant.cpu import MATVEC_MAX_ROWS, CPUWeights, cpu_weights
from deskpod.quant.cpu import kernel_activations as activations
from deskpod.quant.kernels import lowbit_cpu

NO_KERNELS = bool(os.environ.get("DESKPOD_NO_KERNELS"))
needs_kernels = pytest.mark.skipif(NO_KERNELS, reason="DESKPOD_NO_KERNELS is set")

N = 13  # odd rows catch a kernel that handles rows in pairs
# ... and 24, whole groups of eight, are held interleaved where the scheme's blocks can be (ggml.INTERLEAVED)
ROW_COUNTS = [N, 24]
E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float64)
SCHEMES = ["nvfp4", "mxfp4", "fp8", "fp8_e5m2", "int4", "int8"]


# --- the layouts, built by hand, and their meaning --------------------------------------------------------


def _bytes(shape, low: int, high: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=gen, dtype=torch.int32).to(torch.uint8)


def _finite_fp8(shape, e5m2: bool, gen) -> torch.Tensor:
    """Random fp8 bytes, NaN (and inf) codes replaced by zero."""
    b = _bytes(shape, 0, 256, gen)
    special = (b & 0x7C) == 0x7C if e5m2 else (b & 0x7F) == 0x7F
    return torch.where(special, torch.zeros_like(b), b)


def _fp4(n: int, k: int, g, block: int, scale_bytes: tuple[int, int], scale_dtype=torch.uint8) -> dict:
    scales = _bytes((n, -(-k // block)), *scale_bytes, g).view(scale_dtype)
    return {"weight": _bytes((n, -(-k // 2)), 0, 256, g), "weight_scale": scales}


def _fp8(n: int, k: int, g, e5m2: bool) -> dict[str, torch.Tensor]:
    codes = _finite_fp8((n, k), e5m2, g).view(torch.float8_e5m2 if e5m2 else torch.float8_e4m3fn)
    return {"weight": codes, "weight_scale": torch.rand(n, generator=g) * (1e-4 if e5m2 else 1e-2)}


def _group_scales(n: int, k: int, g, offset: float = 0.0, scale: float = 0.1) -> torch.Tensor:
    return ((torch.rand((n, -(-k // 32)), generator=g) + offset) * scale).half()


# scheme -> (n, k, generator) -> its tensors: random codes, scales in a sensible range
LAYOUTS = {
    # E4M3 block scales between 2^-4 and 2^2 (bytes 0x18..0x47), and a per-tensor scale
    "nvfp4": lambda n, k, g: {
        **_fp4(n, k, g, 16, (0x18, 0x48), torch.float8_e4m3fn), "weight_scale_2": torch.tensor(0.0123)
    },
    "mxfp4": lambda n, k, g: _fp4(n, k, g, 32, (121, 131)),  # E8M0 scales 2^-6 .. 2^3
    "fp8": lambda n, k, g: _fp8(n, k, g, e5m2=False),
    "fp8_e5m2": lambda n, k, g: _fp8(n, k, g, e5m2=True),
    "int4": lambda n, k, g: {
        "weight": _bytes((n, -(-k // 2)), 0, 256, g),
        "weight_scale": _group_scales(n, k, g),
        "weight_min": _group_scales(n, k, g, offset=-0.5, scale=1.0),
    },
    "int8": lambda n, k, g: {
        "weight": _bytes((n, k), 0, 256, g).view(torch.int8), "weight_scale": _group_scales(n, k, g)
    },
}


def random_layout(scheme: str, n: int, k: int, seed: int = 0) -> QuantizedTensor:
    """Random codes and sensible scales in `scheme`'s layout for [n, k] (checked against the scheme's)."""
    data = LAYOUTS[scheme](n, k, torch.Generator().manual_seed(seed))
    return QuantizedTensor.from_state_dict(scheme, (n, k), {f"w.{name}": t for name, t in data.items()}, "w")


def _per_block(scales: torch.Tensor, block: int, k: int) -> torch.Tensor:
    return scales.double().repeat_interleave(block, dim=1)[:, :k]


def _nibbles(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Element 2j is the low nibble of byte j, element 2j+1 the high one."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)[:, :k].long()


# the exact checks here are float32's wherever the CPU would take the GEMM in bfloat16 (test_bfloat16_gemm_rounds_each_factor_once checks that)
pytestmark = pytest.mark.usefixtures("float32_gemm")


def reference_weight(qt) -> torch.Tensor:
    """float64 [n, k] straight from the contract's formulas."""
    d, k = qt.data, qt.shape[1]
    if qt.scheme == "nvfp4":
        scales = _per_block(d["weight_scale"].float(), 16, k)
        return E2M1[_nibbles(d["weight"], k)] * scales * float(d["weight_scale_2"])
    if qt.scheme == "mxfp4":
        exponent = _per_block(d["weight_scale"], 32, k)
        return E2M1[_nibbles(d["weight"], k)] * torch.where(exponent == 255, torch.nan, torch.exp2(exponent - 127))
    if qt.scheme in ("fp8", "fp8_e5m2"):
        return d["weight"].double() * d["weight_scale"].double()[:, None]
    if qt.scheme == "int4":
        return _nibbles(d["weight"], k) * _per_block(d["weight_scale"], 32, k) + _per_block(d["weight_min"], 32, k)
    return d["weight"].double() * _per_block(d["weight_scale"], 32, k)


def assert_matches(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor):
    """y = x @ w.T up to float32 summation error, bounded relative to sum |x * w| rather than to y."""
    want = x.double() @ w.T
    assert y.shape == want.shape and y.dtype == torch.float32
    bound = 2e-6 * (x.double().abs() @ w.abs().T)
    err = (y.double() - want).abs()
    assert bool((err <= bound).all()), f"max error {err.max():.3g}, max bound {bound.max():.3g}"


# --- every scheme, every path ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_hand_reference_is_quantized_tensor_dequantize(scheme):
    """The formulas above read the layouts as QuantizedTensor.dequantize does (nibble order, scale bytes)."""
    qt = random_layout(scheme, N, 75, seed=9)
    torch.testing.assert_close(qt.dequantize(torch.float64), reference_weight(qt), rtol=1e-7, atol=0)


@needs_kernels
def test_kernels_build():
    assert lowbit_cpu() is not None, "the low-bit CPU kernels did not build (the logged warning says why)"


@needs_kernels
@pytest.mark.parametrize("k", [192, 75])  # whole blocks; ragged (odd, and not a multiple of 16 or 32)
@pytest.mark.parametrize("m", [1, 3, 64, 65, 200, MATVEC_MAX_ROWS, MATVEC_MAX_ROWS + 1])
@pytest.mark.parametrize("n", ROW_COUNTS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_matches_reference(scheme, n, m, k, monkeypatch):
    monkeypatch.setattr(ggml, "GEMM_TILE", 4 * 192)  # several tiles, the last one short, in the GEMM path
    qt = random_layout(scheme, n, k, seed=m + k)
    layer = cpu_weights(qt)
    assert isinstance(layer, CPUWeights) and (layer.out_features, layer.in_features) == (n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    assert_matches(layer(x), activations(scheme, x), reference_weight(qt))


@needs_kernels
@pytest.mark.parametrize("k", [192, 75])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_bfloat16_gemm_rounds_each_factor_once(scheme, k, monkeypatch):
    monkeypatch.setattr(ggml, "GEMM_TILE", 4 * 192)
    monkeypatch.setattr(ggml, "GEMM_DTYPE", torch.bfloat16)
    qt = random_layout(scheme, N, k, seed=k)
    x = torch.randn(100, k, generator=torch.Generator().manual_seed(k)).double()  # the GEMM path for every scheme
    w = reference_weight(qt)
    # activations (not int8-rounded here), weights and each sum rounded once to bfloat16's 8 significant bits
    bound = 3 * 2**-8 * (x.abs() @ w.abs().T)
    assert bool(((cpu_weights(qt)(x.float()).double() - x @ w.T).abs() <= bound).all())


@needs_kernels
@pytest.mark.parametrize("m", [1, 8, 100])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_weights_match_dequantize_and_linear(scheme, m):
    """What quantize() writes, through the kernels, against the public reference."""
    qt = quantize(torch.randn(N, 203, generator=torch.Generator().manual_seed(m)), scheme)
    x = torch.randn(m, 203)
    assert_matches(cpu_weights(qt)(x), activations(scheme, x), qt.dequantize(torch.float64))
    torch.testing.assert_close(cpu_weights(qt)(x), F.linear(activations(scheme, x), qt.dequantize()), rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("n", ROW_COUNTS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_matvec_kernel_every_row_count(scheme, n):
    """The matvec kernel's row counts 1..8 are separate compiled kernels, and rows come 8 at a time."""
    qt = random_layout(scheme, n, 96, seed=4)
    layer, w = cpu_weights(qt), reference_weight(qt)
    for m in range(1, 18):
        x = torch.randn(m, 96)
        assert_matches(layer._matmul(x), activations(scheme, x), w)


@needs_kernels
@pytest.mark.parametrize("n", ROW_COUNTS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_dequantize_is_the_reference(scheme, n):
    qt = random_layout(scheme, n, 75)
    torch.testing.assert_close(cpu_weights(qt).dequantize().double(), reference_weight(qt), rtol=1e-6, atol=0)


@needs_kernels
@pytest.mark.parametrize("scheme", SCHEMES)
def test_keeps_leading_dimensions(scheme):
    layer = cpu_weights(random_layout(scheme, N, 64))
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(layer(x), layer(x.reshape(6, 64)).reshape(2, 3, N))


@needs_kernels
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("n", ROW_COUNTS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_portable_kernels_match_reference(scheme, n, m):
    """The scalar fallback (what a machine without AVX2 runs) computes the same product and weight."""
    qt = random_layout(scheme, n, 96, seed=3)
    layer = cpu_weights(qt)
    x = torch.randn(m, 96)
    assert_matches(layer._matmul(x, portable=True), activations(scheme, x), reference_weight(qt))
    torch.testing.assert_close(layer._expand(0, n, portable=True).double(), reference_weight(qt), rtol=1e-6, atol=0)


# --- resident memory ------------------------------------------------------------------------------------

# bits per weight the kernels keep resident for a [576, 1536] matrix (SmolLM2's MLP): the stored layout
RESIDENT_BITS = {"nvfp4": 4.5, "mxfp4": 4.25, "fp8": 8 + 32 / 1536, "fp8_e5m2": 8 + 32 / 1536, "int4": 5.0, "int8": 8.5}


@needs_kernels
@pytest.mark.parametrize("scheme", SCHEMES)
def test_resident_memory_is_the_compact_form(scheme):
    qt = random_layout(scheme, 576, 1536)
    layer = cpu_weights(qt)
    bits = 8 * sum(b.numel() * b.element_size() for b in layer.buffers()) / (576 * 1536)
    assert bits == pytest.approx(RESIDENT_BITS[scheme])
    assert bits == pytest.approx(qt.bits_per_weight, rel=1e-4)  # NVFP4's per-tensor scale is kept as a float
    assert not list(layer.parameters())


# --- special values -------------------------------------------------------------------------------------


@needs_kernels
def test_fp8_e4m3_nan_codes_are_left_to_the_reference_path():
    qt = random_layout("fp8", N, 64)
    qt.data["weight"].view(torch.uint8)[3, 5] = 0x7F
    assert cpu_weights(qt) is None


@needs_kernels
@pytest.mark.parametrize("n", ROW_COUNTS)
def test_non_finite_values_propagate_like_the_reference(n):
    """E5M2 infinities and an MXFP4 NaN scale (255) give the same non-finite outputs as dequantize + matmul; a
    zero MXFP4 scale (2^-127) stays finite."""
    e5 = random_layout("fp8_e5m2", n, 64)
    e5.data["weight"].view(torch.uint8)[2, 7] = 0x7C  # +inf
    mx = random_layout("mxfp4", n, 64)
    mx.data["weight_scale"][4, 1] = 255
    mx.data["weight_scale"][5, 0] = 0
    x = torch.randn(3, 64)
    for qt in (e5, mx):
        want = x.double() @ reference_weight(qt).T
        got = cpu_weights(qt)(x)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
        assert got.isfinite().sum() == want.isfinite().sum() > 0


# --- when there is no kernel -----------------------------------------------------------------------------


def test_no_kernel_for_unknown_schemes_or_other_devices():
    assert cpu_weights(QuantizedTensor("bf16", (2, 2), {"weight": torch.zeros(2, 2)})) is None
    assert cpu_weights(random_layout("nvfp4", N, 64).to("meta")) is None


def test_without_kernels_cpu_weights_is_none():
    # the kernel loaders are cached for the process, so the switch is tried in a fresh interpreter
    script = (
        "import sys; sys.path.insert(0, 'tests/quant')\n"
        "from test_cpu import SCHEMES, random_layout\n"
        "from deskpod.quant.cpu import cpu_weights\n"
        "print(*[cpu_weights(random_layout(s, 4, 32)) for s in SCHEMES])\n"
    )
    env = {**os.environ, "DESKPOD_NO_KERNELS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None"] * len(SCHEMES)
