"""The Llama family of decoder-only transformers: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Reads top to bottom in dependency order. Linear layers are whatever the loader gives (float, or
kernel-backed quantized weights); the model only calls them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deskpod.engine.attention import AttentionBatch, PagedKVCache, decode_attention, prefill_attention, store_kv
from deskpod.quant.kernels import ggml_cpu


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    # GGUF files store q/k rows permuted for rotation of adjacent pairs (x0,x1),(x2,x3)...; Hugging Face
    # checkpoints rotate the two halves of each head instead.
    rope_interleaved: bool = True
    rope_scaling: tuple[tuple[str, float], ...] = ()  # Llama 3.1 style: factor, low/high_freq_factor, original_max

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = ggml_cpu() if x.device.type == "cpu" and x.dtype == torch.float32 else None
        if kernels is not None:  # one fused pass instead of PyTorch's chain of small ops
            return kernels.rms_norm(x.contiguous(), self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_frequencies(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with Llama 3.1's long-context rescaling when the file asks for it."""
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    scaling = dict(cfg.rope_scaling)
    if "factor" in scaling and "original_max_position_embeddings" in scaling:
        factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen) - low) / (high - low)
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        mid = (wavelen <= old / low) & (wavelen >= old / high)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv.float()


class Rotary(nn.Module):
    """Rotary position embedding, applied to queries and keys of all heads in one complex multiply."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        angles = torch.outer(torch.arange(cfg.max_context, dtype=torch.float32), rope_frequencies(cfg))
        self.register_buffer("rotations", torch.polar(torch.ones_like(angles), angles), persistent=False)  # [ctx, hd/2]
        self.interleaved = cfg.rope_interleaved

    def forward(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        # x: [T, heads, head_dim], rot: [T, 1, head_dim/2] = rotations[positions]
        T, H, D = x.shape
        if self.interleaved:  # pairs (x0, x1), (x2, x3), ...
            return torch.view_as_real(torch.view_as_complex(x.reshape(T, H, D // 2, 2)) * rot).view(T, H, D)
        # pairs (x_i, x_{i + D/2})
        pairs = x.view(T, H, 2, D // 2).transpose(-1, -2).contiguous()
        return torch.view_as_real(torch.view_as_complex(pairs) * rot).transpose(-1, -2).reshape(T, H, D)


class KVCache(PagedKVCache):
    """The paged cache laid out for one sequence of up to `max_len` tokens (blocks 0, 1, 2, ... in order)."""

    BLOCK_SIZE = 16

    def __init__(self, cfg: LlamaConfig, max_len: int, dtype=torch.float32, device="cpu"):
        blocks = -(-max_len // self.BLOCK_SIZE)
        super().__init__(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, blocks, self.BLOCK_SIZE, dtype, device)
        self.block_table = list(range(blocks))


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, wqkv: nn.Module, wo: nn.Module, rotary: Rotary):
        super().__init__()
        self.wqkv, self.wo, self.rotary = wqkv, wo, rotary
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.head_dim**-0.5

    def forward(self, x: torch.Tensor, batch: AttentionBatch, rot: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # x: [T, hidden]; queries and keys are rotated together, they sit side by side in wqkv's output
        T, D, H, KV = x.shape[0], self.head_dim, self.n_heads, self.n_kv
        qkv = self.wqkv(x).view(T, H + 2 * KV, D)
        qk = self.rotary(qkv[:, : H + KV], rot)
        k_cache, v_cache = kv
        store_kv(k_cache, v_cache, batch.slots, qk[:, H:], qkv[:, H + KV :])
        q = qk[:, :H]
        if batch.all_decode:
            out = decode_attention(q, k_cache, v_cache, batch.decode_block_tables, batch.decode_context_lens, self.scale)
        else:
            out = torch.empty_like(q)
            if len(batch.decode_rows):
                out[batch.decode_rows] = decode_attention(
                    q[batch.decode_rows], k_cache, v_cache, batch.decode_block_tables, batch.decode_context_lens, self.scale
                )
            for chunk in batch.prefills:
                out[chunk.rows] = prefill_attention(q[chunk.rows], k_cache, v_cache, chunk, self.scale)
        return self.wo(out.reshape(T, H * D))


class MLP(nn.Module):
    def __init__(self, w_gate_up: nn.Module, w_down: nn.Module, intermediate: int):
        super().__init__()
        self.w_gate_up, self.w_down, self.intermediate = w_gate_up, w_down, intermediate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).split(self.intermediate, dim=-1)
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, attn_norm: RMSNorm, attn: Attention, mlp_norm: RMSNorm, mlp: MLP):
        super().__init__()
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp

    def forward(self, x, batch: AttentionBatch, rot: torch.Tensor, kv):
        x = x + self.attn(self.attn_norm(x), batch, rot, kv)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig, embed, blocks: list[Block], norm: RMSNorm, lm_head: nn.Module, rotary: Rotary):
        super().__init__()
        self.cfg, self.rotary = cfg, rotary
        self.embed = embed  # callable ids [T] -> [T, hidden]
        self.blocks = nn.ModuleList(blocks)
        self.norm, self.lm_head = norm, lm_head

    @torch.inference_mode()
    def forward_batch(self, ids: torch.Tensor, batch: AttentionBatch, cache: PagedKVCache) -> torch.Tensor:
        """ids: [T], the tokens of every scheduled sequence back to back -> logits [len(logit_rows), vocab]."""
        rot = self.rotary.rotations[batch.positions].unsqueeze(1)  # [T, 1, head_dim/2]
        x = self.embed(ids)
        for block, kv in zip(self.blocks, cache.layers):
            x = block(x, batch, rot, kv)
        return self.lm_head(self.norm(x[batch.logit_rows]))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, all_logits: bool = False):
        """One sequence: ids, positions [T] -> logits [T, vocab] (or [1, vocab] for the last token)."""
        batch = AttentionBatch.build([(len(ids), int(positions[0]), cache.block_table, True)], cache.block_size)
        if all_logits:
            batch = dataclasses.replace(batch, logit_rows=torch.arange(len(ids)))
        return self.forward_batch(ids, batch, cache)
