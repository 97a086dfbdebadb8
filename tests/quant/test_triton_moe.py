"""The Triton grouped-expert kernel (a MoE layer's experts in one launch, weights decoded in the kernel) against
the PyTorch reference: dequantized weights, each token through its chosen experts one by one.

As in test_triton_kernels.py, the kernel runs under Triton's interpreter in a child process (TRITON_INTERPRET=1
must be set before triton is imported), fed and read back through safetensors files."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from deskpod.quant import SCHEMES, quantize

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

EXPERTS, HIDDEN, INTER, TOP_K = 5, 64, 24, 2
UNUSED = 3  # no token chooses this expert: its weights must never be read (they are NaN: reading them shows)

WORKER = """
import sys
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from deskpod.quant import QuantizedTensor
from deskpod.quant.kernels import triton_moe

t = load_file(sys.argv[1])
out = {}
for scheme in sorted({k.split("~")[0] for k in t if k.endswith("~x")}):
    def experts(part, shape):
        return triton_moe.stack_experts([QuantizedTensor.from_state_dict(scheme, shape, t, f"{scheme}~{part}~{e}")
                                         for e in range(%(experts)d)])
    gate_up, down = experts("gate_up", (2 * %(inter)d, %(hidden)d)), experts("down", (%(hidden)d, %(inter)d))
    for case in ("prefill", "decode"):
        x, chosen, weights = t[f"{scheme}~{case}~x"], t[f"{scheme}~{case}~chosen"], t[f"{scheme}~{case}~weights"]
        out[f"{scheme}~{case}"] = triton_moe.experts_forward(
            x, weights, chosen, gate_up, down, lambda g, u: F.silu(g) * u, t[f"{scheme}~gate_up_bias"],
            t[f"{scheme}~down_bias"], block=(16, 32, 32))
save_file(out, sys.argv[2])
""" % {"experts": EXPERTS, "hidden": HIDDEN, "inter": INTER}


def routing(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    used = [e for e in range(EXPERTS) if e != UNUSED]
    chosen = torch.stack([torch.tensor(used)[torch.randperm(len(used), generator=g)[:TOP_K]] for _ in range(tokens)])
    return chosen, torch.softmax(torch.randn(tokens, TOP_K, generator=g), dim=-1)


def poisoned(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return t.float().fill_(float("nan")).to(t.dtype)
    return t.clone().fill_(0xFF) if name.endswith("scale") and t.dtype == torch.uint8 else t


def reference(x, chosen, weights, gate_up, down, gate_up_bias, down_bias) -> torch.Tensor:
    out = torch.zeros(x.shape[0], HIDDEN)
    for t in range(x.shape[0]):
        for j in range(TOP_K):
            e = int(chosen[t, j])
            gate, up = (x[t] @ gate_up[e].dequantize().T + gate_up_bias[e]).split(INTER)
            out[t] += weights[t, j] * ((F.silu(gate) * up) @ down[e].dequantize().T + down_bias[e])
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("triton_moe")
    g = torch.Generator().manual_seed(0)
    tensors, cases = {}, {}
    for scheme in SCHEMES:
        gate_up = [quantize(torch.randn(2 * INTER, HIDDEN, generator=g) * 0.2, scheme) for _ in range(EXPERTS)]
        down = [quantize(torch.randn(HIDDEN, INTER, generator=g) * 0.2, scheme) for _ in range(EXPERTS)]
        for part, experts in (("gate_up", gate_up), ("down", down)):
            for e, qt in enumerate(experts):
                state = qt.state_dict(f"{scheme}~{part}~{e}")
                if e == UNUSED:  # poison its scales (MXFP4's E8M0 255 is NaN): a kernel that reads it gives NaN
                    state = {k: poisoned(k, v) for k, v in state.items()}
                tensors.update(state)
        biases = torch.randn(EXPERTS, 2 * INTER, generator=g), torch.randn(EXPERTS, HIDDEN, generator=g)
        tensors[f"{scheme}~gate_up_bias"], tensors[f"{scheme}~down_bias"] = biases
        for case, tokens in (("prefill", 23), ("decode", 1)):
            x = torch.randn(tokens, HIDDEN, generator=g)
            chosen, weights = routing(tokens, seed=tokens)
            tensors.update({f"{scheme}~{case}~x": x, f"{scheme}~{case}~chosen": chosen,
                            f"{scheme}~{case}~weights": weights})
            cases[f"{scheme}~{case}"] = reference(x, chosen, weights, gate_up, down, *biases)
    save_file(tensors, d / "in.safetensors")
    proc = subprocess.run([sys.executable, "-c", WORKER, str(d / "in.safetensors"), str(d / "out.safetensors")],
                          env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = load_file(d / "out.safetensors")
    return {key: (want, out[key]) for key, want in cases.items()}


@pytest.mark.parametrize("case", ["prefill", "decode"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_grouped_experts_match_the_reference(results, scheme, case):
    want, got = results[f"{scheme}~{case}"]
    assert got.shape == want.shape and torch.isfinite(got).all()  # the unused, poisoned expert was not read
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_align_gives_each_block_one_expert_and_no_block_to_an_unchosen_one():
    from deskpod.quant.kernels.triton_moe import align

    chosen, _ = routing(23, seed=1)
    slots, experts = align(chosen, EXPERTS, 16)
    assert slots.numel() == experts.numel() * 16 and UNUSED not in experts.tolist()
    real = slots[slots < chosen.numel()]
    assert sorted(real.tolist()) == list(range(chosen.numel()))  # every slot once
    for block, expert in enumerate(experts.tolist()):
        mine = slots[block * 16 : (block + 1) * 16]
        mine = mine[mine < chosen.numel()]
        assert (chosen.flatten()[mine.long()] == expert).all()


LAYER_WORKER = """
import sys
import torch
from safetensors.torch import save_file
from deskpod.quant import linear, quantize
from deskpod.engine.models.layers import MLP, MoE

linear._cpu_kernel = lambda qt: None  # weights as buffers (as on a GPU), so the grouped path can take them
torch.manual_seed(0)
out = {}
for scheme in ("mxfp4", "int4"):
    def projection(rows, cols):
        return linear.Linear(linear.SchemeWeight(quantize(torch.randn(rows, cols) * 0.2, scheme)), torch.randn(rows))
    experts = [MLP(projection(48, 64), projection(64, 24), 24, "silu", swiglu=(1.702, 7.0)) for _ in range(6)]
    moe = MoE(linear.Linear(linear.DenseWeight(torch.randn(6, 64))), experts, top_k=2, norm_topk=True)
    x = torch.randn(9, 64)
    out[f"{scheme}~layer"] = moe(x)  # on the CPU: the per-expert path
    weights, chosen = moe.route(x)
    out[f"{scheme}~grouped"] = moe.grouped()(x, weights, chosen)
    out[f"{scheme}~after"] = moe(x)  # the experts' weights, now views of the stacks, give the same
save_file(out, sys.argv[1])
"""


def test_the_moe_layer_gives_the_same_through_the_grouped_kernel(tmp_path):
    """MoE.grouped() (what a CUDA forward takes) over quantized experts with gpt-oss's biases and clamped
    SwiGLU, against the same layer's per-expert path."""
    proc = subprocess.run([sys.executable, "-c", LAYER_WORKER, str(tmp_path / "out.safetensors")],
                          env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = load_file(tmp_path / "out.safetensors")
    for scheme in ("mxfp4", "int4"):
        want = out[f"{scheme}~layer"]
        torch.testing.assert_close(out[f"{scheme}~grouped"], want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        assert torch.equal(out[f"{scheme}~after"], want)
