"""The Llama family of decoder-only transformers: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Reads top to bottom in dependency order. Linear layers are whatever the loader gives (float, or
kernel-backed quantized weights); the model only calls them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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


@dataclass
class Step:
    """What every layer needs to know about the tokens of one forward pass, computed once per pass."""

    positions: torch.Tensor  # [T]
    start: int  # first position written to the cache
    end: int  # one past the last
    rotations: torch.Tensor  # [T, 1, head_dim/2] complex
    hidden: torch.Tensor | None  # [T, end] True where a query must not see a key (None when T == 1)


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


class KVCache:
    """Keys and values of one sequence, for every layer: [layers, kv_heads, max_len, head_dim].

    Heads outermost, so a layer's keys up to the current position are a view that matmul takes as is."""

    def __init__(self, cfg: LlamaConfig, max_len: int, dtype=torch.float32, device="cpu"):
        shape = (cfg.num_layers, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0)))  # per-layer views, made once


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, wqkv: nn.Module, wo: nn.Module, rotary: Rotary):
        super().__init__()
        self.wqkv, self.wo, self.rotary = wqkv, wo, rotary
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.group = cfg.num_heads // cfg.num_kv_heads
        self.scale = cfg.head_dim**-0.5

    def forward(self, x: torch.Tensor, step: Step, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # x: [T, hidden]; queries and keys are rotated together, they sit side by side in wqkv's output
        T, D, H, KV = x.shape[0], self.head_dim, self.n_heads, self.n_kv
        qkv = self.wqkv(x).view(T, H + 2 * KV, D)
        qk = self.rotary(qkv[:, : H + KV], step.rotations)
        k_cache, v_cache = kv  # [kv_heads, max_len, head_dim]
        k_cache[:, step.start : step.end] = qk[:, H:].transpose(0, 1)
        v_cache[:, step.start : step.end] = qkv[:, H + KV :].transpose(0, 1)
        keys, values = k_cache[:, : step.end], v_cache[:, : step.end]  # [kv_heads, S, head_dim]
        # queries grouped by the kv head they share: [kv_heads, group * T, head_dim]
        q = qk[:, :H].view(T, KV, self.group, D).permute(1, 2, 0, 3).reshape(KV, self.group * T, D)
        scores = torch.baddbmm(q.new_zeros(1, 1, 1), q, keys.transpose(1, 2), beta=0, alpha=self.scale)  # [KV, group*T, S]
        if step.hidden is not None:
            scores = scores.masked_fill(step.hidden.repeat(self.group, 1), float("-inf"))
        out = torch.bmm(torch.softmax(scores, dim=-1), values)  # [KV, group * T, head_dim]
        out = out.view(KV, self.group, T, D).permute(2, 0, 1, 3).reshape(T, H * D)
        return self.wo(out)


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

    def forward(self, x, step: Step, kv):
        x = x + self.attn(self.attn_norm(x), step, kv)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig, embed, blocks: list[Block], norm: RMSNorm, lm_head: nn.Module, rotary: Rotary):
        super().__init__()
        self.cfg, self.rotary = cfg, rotary
        self.embed = embed  # callable ids [T] -> [T, hidden]
        self.blocks = nn.ModuleList(blocks)
        self.norm, self.lm_head = norm, lm_head

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, all_logits: bool = False):
        """ids, positions: [T] for one sequence -> logits [T, vocab] (or [1, vocab] for the last token)."""
        start, end = int(positions[0]), int(positions[-1]) + 1
        hidden = None
        if len(ids) > 1:  # query i sees keys up to its own position
            hidden = torch.arange(end, device=ids.device)[None, :] > positions[:, None]
        step = Step(positions, start, end, self.rotary.rotations[positions].unsqueeze(1), hidden)
        x = self.embed(ids)
        for block, kv in zip(self.blocks, cache.layers):
            x = block(x, step, kv)
        if not all_logits:
            x = x[-1:]
        return self.lm_head(self.norm(x))
