"""The Triton fused dequantize+matmul kernels against QuantizedTensor.dequantize() + matmul.

On CPU the kernels run under Triton's interpreter. TRITON_INTERPRET=1 must be set before triton (and any
@triton.jit function) is imported, and it changes how triton's own library functions are built for the
whole process, so the kernels run in a child process with it set: one child per module, fed inputs and
returning outputs through a safetensors file. The parent computes the references.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from deskpod.quant import SCHEMES, QuantizedTensor, quantize

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

# (M, N, K): decode-sized and ragged M, N not a multiple of the tile, K not a multiple of any block
SHAPES = [(1, 24, 64), (5, 33, 45), (17, 16, 100)]
BLOCK = (16, 32, 32)  # small tiles keep the interpreter fast and make every shape span several tiles

WORKER = """
import sys
import torch
from safetensors.torch import load_file, save_file
from deskpod.quant import SCHEMES, QuantizedTensor
from deskpod.quant.kernels import triton_lowbit

t = load_file(sys.argv[1])
out = {}
for key in sorted({k.split(".")[0] for k in t if k.endswith(".x")}):
    scheme, n, k = key.split("~")[0], int(key.split("~")[2]), int(key.split("~")[3])
    qt = QuantizedTensor.from_state_dict(scheme, (n, k), t, key)
    block = None if key.endswith("~default") else (16, 32, 32)
    out[key] = triton_lowbit.matmul(t[key + ".x"], qt, block=block)
save_file(out, sys.argv[2])
"""


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    """Rows spanning 2^-12..2^12 (float16 group scales must hold them) and a near-zero block: exercises subnormal codes and extreme scales."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-12, 12, (n, 1), generator=g).float())
    w[0, : min(k, 16)] *= 1e-6
    return w


def _cases() -> dict[str, tuple[torch.Tensor, QuantizedTensor]]:
    cases = {}
    for scheme in SCHEMES:
        for i, (m, n, k) in enumerate(SHAPES):
            qt = quantize(_weight(n, k, i), scheme)
            cases[f"{scheme}~{m}~{n}~{k}"] = (torch.randn(m, k, generator=torch.Generator().manual_seed(9)), qt)
        # x = I: y = W^T exactly, so every decoded weight is checked bit for bit
        # the default tiles for a prefill-sized M (64 x 64 x 64)
        cases[f"{scheme}~40~70~130~default"] = (torch.randn(40, 130), quantize(_weight(70, 130, 5), scheme))
        cases[f"{scheme}~45~20~45~eye"] = (torch.eye(45), quantize(_weight(20, 45, 7), scheme))
        # half-precision activations (the interpreter mishandles bfloat16 tl.dot, triton-lang/triton#11584:
        # bfloat16 is checked on CUDA below)
        cases[f"{scheme}~3~20~45~f16"] = (torch.randn(3, 45).to(torch.float16), quantize(_weight(20, 45, 8), scheme))
    return cases


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.Tensor, QuantizedTensor, torch.Tensor]]:
    d = tmp_path_factory.mktemp("triton")
    cases = _cases()
    tensors = {}
    for key, (x, qt) in cases.items():
        tensors.update(qt.state_dict(key), **{f"{key}.x": x})
    save_file(tensors, d / "in.safetensors")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, str(d / "in.safetensors"), str(d / "out.safetensors")],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = load_file(d / "out.safetensors")
    return {key: (x, qt, out[key]) for key, (x, qt) in cases.items()}


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_decoded_weights_are_exact(scheme: str, results) -> None:
    _, qt, y = results[f"{scheme}~45~20~45~eye"]
    assert torch.equal(y, qt.dequantize().T)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_matches_the_reference_matmul(scheme: str, m: int, n: int, k: int, results) -> None:
    x, qt, y = results[f"{scheme}~{m}~{n}~{k}"]
    ref = x @ qt.dequantize().T
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_default_tiles(scheme: str, results) -> None:
    x, qt, y = results[f"{scheme}~40~70~130~default"]
    ref = x @ qt.dequantize().T
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_arguments_are_checked_before_launch() -> None:
    from deskpod.quant.kernels import triton_lowbit

    qt = quantize(_weight(8, 40, 0), "nvfp4")
    assert triton_lowbit.matmul(torch.zeros(0, 40), qt).shape == (0, 8)  # no rows: nothing to launch
    with pytest.raises(ValueError, match=r"x must be \[M, 40\]"):
        triton_lowbit.matmul(torch.zeros(3, 41), qt)
    with pytest.raises(ValueError, match="no Triton kernel for scheme 'q3'"):
        triton_lowbit.matmul(torch.zeros(3, 40), QuantizedTensor("q3", (8, 40), {}))
    assert triton_lowbit.default_block(1) == (16, 64, 64) and triton_lowbit.default_block(500) == (64, 64, 64)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_float16_activations(scheme: str, results) -> None:
    x, qt, y = results[f"{scheme}~3~20~45~f16"]
    ref = x.float() @ qt.dequantize().T
    assert y.dtype == torch.float16
    assert torch.allclose(y.float(), ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU runs use the interpreter)")
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_quant_linear_on_cuda(scheme: str) -> None:
    from deskpod.quant import QuantLinear

    qt = quantize(_weight(300, 1000, 1), scheme)
    layer = QuantLinear(qt.to("cuda"))
    for m in (1, 7, 64):
        x = torch.randn(m, 1000, device="cuda")
        ref = F.linear(x, qt.dequantize().cuda())
        assert torch.allclose(layer(x), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
        xb = x.bfloat16()
        ref = F.linear(xb.float(), qt.dequantize().cuda())
        assert torch.allclose(layer(xb).float(), ref, rtol=3e-2, atol=3e-2 * float(ref.abs().max()))


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_compiles_for_a_hopper_gpu(scheme: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The interpreter is more lenient than the compiler: build the real sm_90 kernel (no GPU needed)."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile for real, and leave ~/.triton alone
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import mangle_type

    from deskpod.quant.kernels import triton_lowbit

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    qt = quantize(_weight(64, 128, 0), scheme)
    x = torch.zeros(16, 128, dtype=torch.bfloat16)
    args, constants = triton_lowbit.launch_args(x, qt, (16, 64, 64), torch.empty(16, 64, dtype=torch.bfloat16))
    signature = {k: mangle_type(v) for k, v in args.items()} | dict.fromkeys(constants, "constexpr")
    source = triton.compiler.ASTSource(triton_lowbit._lowbit_matmul, signature, constexprs=constants)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})
    assert "mma.sync" in kernel.asm["ptx"]  # bfloat16 tensor-core tiles
