"""ggml blocks read into deskpod's u4/i8 forms, and the kernel-backed linear layers over them.

The `gguf` package is the reference: its quantize makes the blocks, its dequantize says what they mean."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from deskpod.quant.ggml import GROUP, I8_READERS, MATVEC_MAX_ROWS, U4_READERS, I8Weight, U4Weight, compact_linear
from deskpod.quant.kernels import ggml_cpu

N, K = 13, 256  # odd rows catch a kernel that handles rows in pairs or fours; 256 fits Q4_K's super-block

# Without the kernels the engine silently runs float32, so a kernel that stops compiling would leave every other
# test green: here it fails, unless running without kernels was asked for.
NO_KERNELS = bool(os.environ.get("DESKPOD_NO_KERNELS"))
needs_kernels = pytest.mark.skipif(NO_KERNELS, reason="DESKPOD_NO_KERNELS is set")


def q4_k_blocks(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random but valid Q4_K bytes: any 6-bit scales, mins and nibbles are legal; d and dmin are set small."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows, cols // 256, 144), dtype=np.uint8)
    blocks[..., 0:2] = rng.uniform(0.001, 0.01, (rows, cols // 256, 1)).astype(np.float16).view(np.uint8)
    blocks[..., 2:4] = rng.uniform(0.001, 0.01, (rows, cols // 256, 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def blocks_of(qtype: str, seed: int = 0) -> np.ndarray:
    """[N, bytes per row] of `qtype` blocks for an N x K matrix."""
    if qtype == "Q4_K":
        return q4_k_blocks(N, K, seed)
    weights = np.random.default_rng(seed).standard_normal((N, K)).astype(np.float32)
    return quantize(weights, Q[qtype])


def reference_weights(qtype: str, raw: np.ndarray) -> np.ndarray:
    return dequantize(raw, Q[qtype]).astype(np.float32).reshape(N, K)


def unpack_u4(codes: np.ndarray) -> np.ndarray:
    """[rows, K/2] packed groups (low nibbles are elements 0..15, high nibbles 16..31) -> [rows, K] codes."""
    g = codes.reshape(codes.shape[0], -1, 16)
    return np.concatenate([g & 0x0F, g >> 4], axis=-1).reshape(codes.shape[0], -1)


@pytest.mark.parametrize("qtype", sorted(U4_READERS))
def test_u4_reader_reconstructs_ggml_exactly(qtype):
    raw = blocks_of(qtype)
    codes, scales, mins = U4_READERS[qtype](raw, (N, K))
    assert codes.shape == (N, K // 2) and scales.shape == mins.shape == (N, K // GROUP)
    q = unpack_u4(codes).reshape(N, -1, GROUP).astype(np.float32)
    rebuilt = (q * scales[..., None] + mins[..., None]).reshape(N, K)
    np.testing.assert_array_equal(rebuilt, reference_weights(qtype, raw))


@pytest.mark.parametrize("qtype", sorted(I8_READERS))
def test_i8_reader_reconstructs_ggml_exactly(qtype):
    raw = blocks_of(qtype)
    codes, scales = I8_READERS[qtype](raw, (N, K))
    assert codes.dtype == np.int8 and codes.shape == (N, K) and scales.shape == (N, K // GROUP)
    rebuilt = (codes.reshape(N, -1, GROUP).astype(np.float32) * scales[..., None]).reshape(N, K)
    np.testing.assert_array_equal(rebuilt, reference_weights(qtype, raw))


@needs_kernels
def test_kernels_build():
    assert ggml_cpu() is not None, "the CPU kernels did not build (the logged warning says why)"


def test_q4_k_is_read_compact():
    assert "Q4_K" in U4_READERS, "Q4_K (the most common GGUF type) has no compact reader"


def _layer(qtype: str, raw: np.ndarray):
    layer = compact_linear(qtype, raw, (N, K))
    assert isinstance(layer, U4Weight if qtype in U4_READERS else I8Weight)
    return layer


@needs_kernels
@pytest.mark.parametrize("rows", [1, MATVEC_MAX_ROWS, MATVEC_MAX_ROWS + 9])  # matvec kernel, its edge, dequantize+GEMM
@pytest.mark.parametrize("qtype", sorted(U4_READERS) + sorted(I8_READERS))
def test_linear_matches_float_matmul(qtype, rows):
    raw = blocks_of(qtype, seed=rows)
    layer = _layer(qtype, raw)
    w = torch.from_numpy(reference_weights(qtype, raw)).double()
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
    y = layer(x)
    want = x.double() @ w.T
    assert y.shape == (rows, N) and y.dtype == torch.float32
    # float32 sums of K products: error bound relative to the sum of |x * w| rather than to the result
    scale = (x.double().abs() @ w.abs().T).max()
    assert (y.double() - want).abs().max() <= 1e-6 * scale, f"max error {(y.double() - want).abs().max():.3g}"


@needs_kernels
@pytest.mark.parametrize("qtype", sorted(U4_READERS) + sorted(I8_READERS))
def test_linear_keeps_leading_dimensions(qtype):
    layer = _layer(qtype, blocks_of(qtype))
    x = torch.randn(2, 3, K)
    torch.testing.assert_close(layer(x), layer(x.reshape(6, K)).reshape(2, 3, N))


@needs_kernels
@pytest.mark.parametrize("qtype", sorted(U4_READERS))
def test_u4_dequantize_kernel_matches_ggml(qtype):
    raw = blocks_of(qtype)
    layer = _layer(qtype, raw)
    want = torch.from_numpy(reference_weights(qtype, raw))
    torch.testing.assert_close(layer.dequantize(), want, rtol=1e-6, atol=1e-7)


@needs_kernels
def test_i8_rows_is_an_embedding_lookup():
    raw = blocks_of("Q8_0")
    layer = _layer("Q8_0", raw)
    ids = torch.tensor([0, 12, 5, 5])
    np.testing.assert_array_equal(layer.rows(ids).numpy(), reference_weights("Q8_0", raw)[ids.numpy()])


@needs_kernels
def test_no_compact_form_for_other_types_or_ragged_rows():
    assert compact_linear("F16", np.zeros((N, K), np.float16), (N, K)) is None
    assert compact_linear("Q5_K", np.zeros((N, K // 256 * 176), np.uint8), (N, K)) is None
    # 48 columns is not a whole number of 32-groups: no u4/i8 layout for it
    assert compact_linear("Q8_0", np.zeros((N, 48 // 32 * 34), np.uint8), (N, 48)) is None


def test_without_kernels_nothing_is_compact():
    # ggml_cpu() is cached for the process, so the switch is tried in a fresh interpreter
    script = (
        "import numpy as np\n"
        "from deskpod.quant.kernels import ggml_cpu\n"
        "from deskpod.quant.ggml import compact_linear\n"
        "raw = np.zeros((4, 34), np.uint8)\n"
        "print(ggml_cpu(), compact_linear('Q8_0', raw, (4, 32)), compact_linear('Q4_0', raw[:, :18], (4, 32)))\n"
    )
    env = {**os.environ, "DESKPOD_NO_KERNELS": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "None", "None"]
