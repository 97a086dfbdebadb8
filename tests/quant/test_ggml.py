"""GGUF's block types kept as stored (BlockWeight over kernels/ggml_blocks.cpp): the `gguf` package says what
the blocks mean (its dequantize is the reference), and the integer kernels compute exactly what quantizing
the activations to int8 per 32 and multiplying by those weights gives."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from deskpod.quant import ggml
from deskpod.quant.ggml import (BLOCK_WEIGHTS, GGML_TYPES, INTERLEAVED, INTERLEAVED_ROWS, MATVEC_MAX_ROWS, BlockWeight,
                                has_kernel)
from deskpod.quant.kernels import ggml_blocks

N, K = 13, 512  # odd rows catch a kernel that handles rows in pairs or fours; 512 is two K-quant super-blocks
TYPES = sorted(GGML_TYPES)
K_QUANT_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}

# Without the kernels the engine silently runs float32, so a kernel that stops compiling would leave every other
# test green: here it fails, unless running without kernels was asked for.
NO_KERNELS = bool(os.environ.get("DESKPOD_NO_KERNELS"))
needs_kernels = pytest.mark.skipif(NO_KERNELS, reason="DESKPOD_NO_KERNELS is set")


# the exact checks here are float32's wherever the CPU would take the GEMM in bfloat16 (test_block_weight_paths checks that)
pytestmark = pytest.mark.usefixtures("float32_gemm")


def blocks_of(qtype: str, seed: int = 0, rows: int = N, width: int = K) -> np.ndarray:
    """[rows, bytes per row] of valid `qtype` blocks for a rows x width matrix: the gguf package quantizes the
    types it can; for K-quants any bytes are legal once the float16 scales are set small and finite."""
    rng = np.random.default_rng(seed)
    if qtype not in K_QUANT_BYTES:
        return quantize(rng.standard_normal((rows, width)).astype(np.float32), Q[qtype])
    blocks = rng.integers(0, 256, size=(rows, width // 256, K_QUANT_BYTES[qtype]), dtype=np.uint8)
    for offset in (208,) if qtype == "Q6_K" else (0, 2):  # d (Q6_K: at the end), dmin
        blocks[..., offset : offset + 2] = rng.uniform(0.001, 0.01, (rows, width // 256, 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def reference_weights(qtype: str, raw: np.ndarray) -> np.ndarray:
    return dequantize(raw, Q[qtype]).astype(np.float32).reshape(len(raw), -1)


# the kernels for this CPU's instruction sets, and the plain loops every machine compiles
PATHS = {"native": {}, "portable": {"portable": True}}
# a row of 16 slices, and of 3 (an odd count: the kernels take slices in pairs) for the types of 32-weight blocks
WIDTHS = [(qtype, width) for qtype in TYPES for width in (K, 96) if width % BLOCK_WEIGHTS.get(qtype, 32) == 0]


# every type in its file's row layout; the INTERLEAVED ones also regrouped eight rows at a time (24 rows: three groups)
TYPE_LAYOUTS = [(qtype, "rows") for qtype in TYPES] + [(qtype, "interleaved") for qtype in sorted(INTERLEAVED & set(GGML_TYPES))]
WIDTH_LAYOUTS = [(qtype, width, layout) for qtype, width in WIDTHS for q, layout in TYPE_LAYOUTS if q == qtype]
LAYOUT_ROWS = {"rows": N, "interleaved": 3 * INTERLEAVED_ROWS}


def held(qtype: str, raw: np.ndarray, layout: str) -> tuple[torch.Tensor, int]:
    """The blocks and type id the kernels take for `raw` (the file's rows) held in `layout`."""
    blocks = torch.from_numpy(raw)
    if layout == "rows":
        return blocks, GGML_TYPES[qtype]
    return ggml_blocks().interleave(blocks, GGML_TYPES[qtype]), GGML_TYPES[qtype] + ggml_blocks().X8


def needs_simd() -> None:
    if not ggml_blocks().simd():
        pytest.skip("this CPU runs the plain-loop kernels, for which weights keep the file's row layout")


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """What the kernels multiply by: x rounded to int8 per block of 32 with scale d = max|x| / 127 (llama.cpp's
    Q8_0), the codes found in float32 as the kernels find them (round half to even of x * (1 / d)), then exact
    in float64."""
    blocks = x.float().reshape(len(x), -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    codes = torch.round(blocks * torch.where(d > 0, 1 / d, 0))
    return (codes.double() * d.double()).reshape(x.shape)


@needs_kernels
def test_kernels_build():
    assert ggml_blocks() is not None, "the CPU kernels did not build (the logged warning says why)"


@needs_kernels
@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("qtype, layout", TYPE_LAYOUTS)
def test_dequantize_is_exactly_ggml(qtype, portable, layout):
    raw = blocks_of(qtype, rows=LAYOUT_ROWS[layout])
    ids = torch.randperm(len(raw), generator=torch.Generator().manual_seed(0))  # any order
    got = ggml_blocks().dequantize_rows(*held(qtype, raw, layout), K, ids, portable)
    np.testing.assert_array_equal(got.numpy(), reference_weights(qtype, raw)[ids.numpy()])


@needs_kernels
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows", [1, 3, 8, 13])  # the 8/4/2/1-row kernels and their mixes
@pytest.mark.parametrize("qtype, width, layout", WIDTH_LAYOUTS)
def test_matmul_is_int8_activations_times_the_weights(qtype, width, rows, path, layout):
    raw = blocks_of(qtype, seed=rows, rows=LAYOUT_ROWS[layout], width=width)
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(rows))
    y = ggml_blocks().matmul(x, *held(qtype, raw, layout), **PATHS[path])
    w = torch.from_numpy(reference_weights(qtype, raw)).double()
    want = int8_activations(x) @ w.T
    # float32 sums of K products: error bound relative to the sum of |x * w| rather than to the result
    scale = (x.double().abs() @ w.abs().T).max()
    assert (y.double() - want).abs().max() <= 2e-6 * scale, f"max error {(y.double() - want).abs().max():.3g}"
    # and close to the float product: the int8 rounding of activations is all that separates them
    exact = x.double() @ w.T
    assert float((y.double() - exact).norm() / exact.norm()) < 0.02


@needs_kernels
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("qtype, layout", TYPE_LAYOUTS)
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(qtype, path, layout):
    """Bit for bit: speculative decoding checks its guesses as rows of one step and must reply what decoding a
    token a step replies."""
    raw, type_id = held(qtype, blocks_of(qtype, seed=5, rows=LAYOUT_ROWS[layout]), layout)
    x = torch.randn(13, K, generator=torch.Generator().manual_seed(5))
    together = ggml_blocks().matmul(x, raw, type_id, **PATHS[path])
    for row in range(13):
        alone = ggml_blocks().matmul(x[row : row + 1].contiguous(), raw, type_id, **PATHS[path])
        assert torch.equal(alone[0], together[row]), f"row {row}"


@needs_kernels
# the integer kernels, and dequantize + GEMM in either type
@pytest.mark.parametrize("rows, gemm", [(1, "float32"), (MATVEC_MAX_ROWS + 9, "float32"), (MATVEC_MAX_ROWS + 9, "bfloat16")])
@pytest.mark.parametrize("qtype", ["Q4_0", "Q6_K"])
def test_block_weight_paths(qtype, rows, gemm, monkeypatch):
    monkeypatch.setattr(ggml, "GEMM_DTYPE", getattr(torch, gemm))
    raw = blocks_of(qtype)
    layer = BlockWeight(qtype, torch.from_numpy(raw), K)
    x = torch.randn(2, rows, K)
    y = layer(x)
    assert y.shape == (2, rows, N) and y.dtype == torch.float32
    y = y.reshape(-1, N).double()
    x, w = x.reshape(-1, K).double(), torch.from_numpy(reference_weights(qtype, raw)).double()
    if gemm == "float32":
        # both paths multiply by int8-rounded activations: a row's result does not depend on the batch around it
        torch.testing.assert_close(y, int8_activations(x.float()) @ w.T, rtol=1e-5, atol=5e-4)  # sums of 512 products
    else:  # activations, weights and each sum rounded once to bfloat16 (8 significant bits)
        bound = 3 * 2**-8 * (x.abs() @ w.abs().T)
        assert bool(((y - x @ w.T).abs() <= bound).all())


@needs_kernels
@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q6_K"])
def test_rows_are_an_embedding_lookup(qtype):
    raw = blocks_of(qtype)
    layer = BlockWeight(qtype, torch.from_numpy(raw), K)
    ids = torch.tensor([0, 12, 5, 5])
    np.testing.assert_array_equal(layer.rows(ids).numpy(), reference_weights(qtype, raw)[ids.numpy()])
    np.testing.assert_array_equal(layer.take_rows(ids).dequantize().numpy(), reference_weights(qtype, raw)[ids.numpy()])


@needs_kernels
@pytest.mark.parametrize("qtype", sorted(INTERLEAVED & set(GGML_TYPES)))
def test_interleaving_only_reorders_the_bits(qtype):
    raw = torch.from_numpy(blocks_of(qtype, rows=16))
    interleaved = ggml_blocks().interleave(raw, GGML_TYPES[qtype])
    assert not torch.equal(interleaved, raw) and interleaved.shape == raw.shape
    set_bits = [int(np.unpackbits(t.numpy()).sum()) for t in (raw, interleaved)]
    assert set_bits[0] == set_bits[1]  # Q5's fifth bits move one by one; the rest moves in whole bytes
    assert torch.equal(ggml_blocks().interleave(interleaved, GGML_TYPES[qtype], to_rows=True), raw)


@needs_kernels
def test_block_weight_interleaves_whole_groups_of_rows():
    """Held interleaved where the rows come in whole groups (the file's bytes untouched); else as the file has them.
    Either way the layer computes the same, and takes rows as the file holds them."""
    needs_simd()
    raw = blocks_of("Q4_0", rows=16)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(3))
    grouped, plain = BlockWeight("Q4_0", torch.from_numpy(raw), K), BlockWeight("Q4_0", torch.from_numpy(raw), K, interleave=False)
    assert grouped.interleaved and not plain.interleaved and "interleaved" in repr(grouped)
    assert torch.equal(torch.from_numpy(raw), grouped.file_blocks()) and not torch.equal(grouped.blocks, grouped.file_blocks())
    torch.testing.assert_close(grouped(x), plain(x), rtol=1e-5, atol=1e-5)
    ids = torch.tensor([15, 2, 2, 9, 0, 1, 3, 4])  # 8 rows: the part is interleaved again
    part = grouped.take_rows(ids)
    assert part.interleaved and torch.equal(part.file_blocks(), torch.from_numpy(raw)[ids])
    np.testing.assert_array_equal(part.dequantize().numpy(), reference_weights("Q4_0", raw)[ids.numpy()])
    assert not BlockWeight("Q4_0", torch.from_numpy(raw[:13]), K).interleaved  # 13 rows: no whole groups
    assert not BlockWeight("Q6_K", torch.from_numpy(blocks_of("Q6_K", rows=16)), K).interleaved  # no such layout


@needs_kernels
def test_multi_matmul_takes_both_layouts_at_once():
    """A MoE layer's experts may be held either way (a ragged expert stays in rows): each product is the one its
    weight computes alone."""
    needs_simd()
    rows8, rows13 = blocks_of("Q8_0", seed=1, rows=24), blocks_of("Q4_1", seed=2)
    a, b = BlockWeight("Q8_0", torch.from_numpy(rows8), K), BlockWeight("Q4_1", torch.from_numpy(rows13), K)
    assert a.interleaved and not b.interleaved
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(4))
    out = ggml.multi_matmul(x, [ggml.Placed(a, 0, 0, 3), ggml.Placed(b, 1, 2, 3, col=24)], 5, 24 + 13)
    assert torch.equal(out[0:3, :24], a(x[0:3])) and torch.equal(out[2:5, 24:], b(x[1:4]))


@needs_kernels
def test_an_interleaved_type_needs_whole_groups():
    raw = torch.from_numpy(blocks_of("Q4_0", rows=13))
    with pytest.raises(RuntimeError, match="not groups of 8"):
        ggml_blocks().matmul(torch.randn(1, K), raw, GGML_TYPES["Q4_0"] + ggml_blocks().X8)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        ggml_blocks().interleave(raw, GGML_TYPES["Q4_0"])
    with pytest.raises(RuntimeError, match="no interleaved layout"):
        ggml_blocks().interleave(torch.from_numpy(blocks_of("Q6_K", rows=16)), GGML_TYPES["Q6_K"])


@needs_kernels
def test_kernels_need_whole_blocks():
    assert has_kernel("Q4_0", (N, 64)) and not has_kernel("Q4_0", (N, 48))
    assert has_kernel("Q6_K", (N, 256)) and not has_kernel("Q6_K", (N, 128))  # a K-quant row is whole 256s
    assert not has_kernel("F16", (N, 64)) and not has_kernel("Q2_K", (N, 256))


def test_without_kernels_nothing_is_compact():
    # ggml_blocks() is cached for the process, so the switch is tried in a fresh interpreter
    script = "from deskpod.quant.ggml import has_kernel\nprint(has_kernel('Q8_0', (4, 32)), has_kernel('Q4_0', (4, 32)))\n"
    env = {**os.environ, "DESKPOD_NO_KERNELS": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]
