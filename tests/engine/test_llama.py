"""The Llama model on a tiny random GGUF: compact weights (int8-rounded activations, as llama.cpp) stay close
to float32 weights, and the KV cache makes token-by-token decoding equal to one pass over the whole sequence:
exactly in float32, within the int8 rounding of activations in compact mode."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from support.loading import kv_cache, load
from support.loading import logits_of as forward

from deskpod.engine.models.layers import RMSNorm
from deskpod.quant.ggml import MATVEC_MAX_ROWS

# long enough to cross the matvec/GEMM switch three times (MATVEC_MAX_ROWS tokens each)
TEXT = "<|im_start|>user\n" + "the inner herb, the heron; " * 14 + "<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module", params=["tied", "untied"])
def tiny_models(request, make_tiny_llama):
    """The tiny model in both weight modes; tied: the Q8_0 embedding is also the output head (as in SmolLM2)."""
    path = make_tiny_llama(tied=request.param == "tied")
    return {mode: load(path, mode) for mode in ("compact", "float32")}


@pytest.fixture(scope="module")
def ids(tiny_models) -> list[int]:
    ids = tiny_models["compact"].tokenizer.encode(TEXT)
    assert len(ids) >= 3 * MATVEC_MAX_ROWS
    return ids


@pytest.mark.skipif(bool(os.environ.get("DESKPOD_NO_KERNELS")), reason="DESKPOD_NO_KERNELS is set")
def test_compact_layers_are_used(tiny_models):
    kinds = {type(m).__name__ for m in tiny_models["compact"].model.modules()}
    assert {"BlockWeight", "DenseWeight", "ConcatWeight"} <= kinds  # Q4_x / Q8_0, F16/BF16, q/k/v of mixed types
    assert "BlockWeight" not in {type(m).__name__ for m in tiny_models["float32"].model.modules()}


@pytest.mark.parametrize("rows", ["prefill", "decode"])
def test_compact_and_float32_logits_agree(tiny_models, ids, rows):
    # a long prefill takes the dequantize + GEMM path, one token at a time the matvec kernels
    chunks = None if rows == "prefill" else [1] * len(ids)
    compact, dense = forward(tiny_models["compact"], ids, chunks), forward(tiny_models["float32"], ids, chunks)
    assert compact.shape == (len(ids), tiny_models["compact"].spec.vocab_size)
    assert dense.abs().max() > 2  # logits of a real spread, so the tolerance below means something
    assert float((compact - dense).norm() / dense.norm()) < 0.02  # measured 0.9%: the int8 rounding of activations
    assert (compact.argmax(-1) == dense.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("mode", ["compact", "float32"])
def test_incremental_decoding_equals_one_full_pass(tiny_models, ids, mode, float32_gemm):
    # float32_gemm: what this checks is the cache, not a GEMM's rounding
    lm = tiny_models[mode]
    full = forward(lm, ids)
    # a prefill, then token by token; and chunks on both sides of the matvec/GEMM switch
    mixed = [MATVEC_MAX_ROWS + 1, 3, MATVEC_MAX_ROWS, len(ids) - 2 * MATVEC_MAX_ROWS - 4]
    # compact: float rounding that differs between paths can move an int8 rounding of an activation, or a key's
    # float16 rounding in the cache, by one step
    atol = 1e-4 if mode == "float32" else 0.01 * float(full.abs().max())
    for chunks in ([5] + [1] * (len(ids) - 5), mixed):
        torch.testing.assert_close(forward(lm, ids, chunks), full, rtol=0, atol=atol)


def test_last_logits_only_by_default(tiny_models, ids, float32_gemm):
    # the head meets one row in the integer kernels, all of them in the GEMM: in float32 the same products
    lm = tiny_models["compact"]
    last = lm.model(torch.tensor(ids), torch.arange(len(ids)), kv_cache(lm, len(ids)))
    assert last.shape == (1, lm.spec.vocab_size)
    torch.testing.assert_close(last[0], forward(lm, ids)[-1])


def test_causal_mask_later_tokens_do_not_change_earlier_logits(tiny_models, ids):
    lm = tiny_models["float32"]
    changed = ids[:-3] + [(i + 1) % lm.spec.vocab_size for i in ids[-3:]]
    torch.testing.assert_close(forward(lm, changed)[:-3], forward(lm, ids)[:-3], rtol=0, atol=1e-5)
    assert not torch.allclose(forward(lm, changed)[-2:], forward(lm, ids)[-2:])


def test_rms_norm_matches_pytorch():
    weight = torch.randn(64)
    x = torch.randn(5, 64) * 3
    torch.testing.assert_close(RMSNorm(weight, 1e-5)(x), F.rms_norm(x, (64,), weight, 1e-5), rtol=1e-5, atol=1e-5)


def test_per_head_norms_are_the_norms_of_each_head():
    """Queries' and keys' heads normed in one kernel call, read in place from the fused projection's output (its
    rows strided), exactly as the norm of each head alone."""
    from deskpod.engine.models.layers import Attention, AttentionOptions

    H, KV, D = 4, 2, 16
    q_norm, k_norm = RMSNorm(torch.randn(D), 1e-6), RMSNorm(torch.randn(D), 1e-5)
    attn = Attention(AttentionOptions(H, KV, D, 1.0), None, None, 0, q_norm, k_norm)
    qkv = torch.randn(3, H + 2 * KV, D) * 3
    qk = qkv[:, : H + KV]  # strided: every token's values follow
    got = attn.head_norms(qk, H)
    assert torch.equal(got[:, :H], q_norm(qk[:, :H].contiguous())) and torch.equal(got[:, H:], k_norm(qk[:, H:].contiguous()))
    torch.testing.assert_close(got[:, :H], F.rms_norm(qk[:, :H], (D,), q_norm.weight, 1e-6), rtol=1e-5, atol=1e-5)
