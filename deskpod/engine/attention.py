"""Attention over a paged KV cache, for a batch that mixes decoding sequences and prefill chunks.

The cache is a pool of fixed-size blocks per layer: [num_blocks, block_size, kv_heads, head_dim]. A
sequence's block table says which blocks hold its positions, so position p lives at flat slot
block_table[p // block_size] * block_size + p % block_size. Decoding sequences (one new token each) are
attended to together; each prefill chunk (several tokens of one sequence) is attended to on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from deskpod.quant.kernels import cpu_ops

# The cache types the CPU kernels read and write in place (float32 queries, the arithmetic in float32)
KERNEL_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cpu_kernels_for(q: torch.Tensor, k_cache: torch.Tensor):
    """deskpod's CPU kernels (RoPE with the cache writes, decode attention) when they take these queries and this
    cache: float32 queries on the CPU, a cache of KERNEL_CACHE_DTYPES; None otherwise (or where none are built)."""
    on_cpu = q.device.type == "cpu" and q.dtype == torch.float32 and k_cache.dtype in KERNEL_CACHE_DTYPES
    return cpu_ops() if on_cpu else None


class PagedKVCache:
    """Keys and values for every layer: [layers, num_blocks, block_size, kv_heads, head_dim]."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype=torch.float32, device="cpu", alloc=torch.zeros):
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = alloc(shape, dtype=dtype, device=device)
        self.v = alloc(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0)))  # per-layer views, made once


@dataclass(frozen=True)
class PrefillChunk:
    rows: slice  # its tokens' rows in the batch
    block_table: torch.Tensor  # [blocks covering the context] long
    start: int  # position of its first token
    context_len: int  # keys visible to its last token
    _masks: dict = field(default_factory=dict, compare=False, repr=False)  # built once per pass, used by every layer

    def hidden(self, first_key: int, window: int) -> torch.Tensor:
        """[T, context_len - first_key] True where a query must not see key first_key + j: the future, and
        with a sliding window, keys `window` or more positions back."""
        if (first_key, window) not in self._masks:
            device = self.block_table.device
            q_pos = torch.arange(self.start, self.context_len, device=device)[:, None]
            k_pos = torch.arange(first_key, self.context_len, device=device)[None, :]
            hidden = k_pos > q_pos
            self._masks[first_key, window] = hidden | (q_pos - k_pos >= window) if window else hidden
        return self._masks[first_key, window]


@dataclass(frozen=True)
class AttentionBatch:
    """Where every token of a forward pass goes in the cache and which keys it sees. Built once per pass."""

    positions: torch.Tensor  # [T] long
    slots: torch.Tensor  # [T] long, flat cache index of each token's key and value
    decode_rows: torch.Tensor  # [B] long, rows of the single-token sequences
    decode_block_tables: torch.Tensor  # [B, max_blocks] long, padded with 0
    decode_context_lens: torch.Tensor  # [B] long
    prefills: tuple[PrefillChunk, ...]
    logit_rows: torch.Tensor  # [R] long, rows whose next-token logits are wanted

    @property
    def all_decode(self) -> bool:
        return not self.prefills

    def to(self, device: torch.device) -> AttentionBatch:
        """The same batch with its index tensors on `device` (the model's)."""
        if device.type == "cpu":
            return self
        move = {f: getattr(self, f).to(device) for f in ("positions", "slots", "decode_rows", "decode_block_tables",
                                                         "decode_context_lens", "logit_rows")}
        chunks = tuple(PrefillChunk(c.rows, c.block_table.to(device), c.start, c.context_len) for c in self.prefills)
        return AttentionBatch(**move, prefills=chunks)

    @classmethod
    def build(cls, sequences: list[tuple[int, int, list[int], bool]], block_size: int) -> AttentionBatch:
        """sequences: (num_tokens, start position, block table, how many of its last rows want logits) for
        each, in batch order."""
        positions, slots, decode_rows, decode_tables, decode_lens, prefills, logit_rows = [], [], [], [], [], [], []
        row = 0
        for n, start, table, num_logits in sequences:
            pos = range(start, start + n)
            positions.extend(pos)
            slots.extend(table[p // block_size] * block_size + p % block_size for p in pos)
            end = start + n
            used = table[: -(-end // block_size)]
            if n == 1:
                decode_rows.append(row)
                decode_tables.append(used)
                decode_lens.append(end)
            else:
                prefills.append(PrefillChunk(slice(row, row + n), torch.tensor(used), start, end))
            logit_rows.extend(range(row + n - int(num_logits), row + n))
            row += n
        width = max((len(t) for t in decode_tables), default=0)
        return cls(
            positions=torch.tensor(positions),
            slots=torch.tensor(slots),
            decode_rows=torch.tensor(decode_rows, dtype=torch.long),
            decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in decode_tables], dtype=torch.long).view(len(decode_tables), width),
            decode_context_lens=torch.tensor(decode_lens, dtype=torch.long),
            prefills=tuple(prefills),
            logit_rows=torch.tensor(logit_rows, dtype=torch.long),
        )


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    # k, v: [T, kv_heads, head_dim]; caches: [num_blocks, block_size, kv_heads, head_dim], in the cache's own type
    kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, window: int = 0, softcap: float = 0.0,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B, heads, head_dim], one query per sequence -> [B, heads, head_dim]. With a window, each query sees
    only the last `window` keys of its sequence (itself included); softcap: scores -> c · tanh(scores / c);
    sinks [heads]: a learned logit per head that joins the softmax's denominator and attends to nothing
    (gpt-oss). The cache may hold a narrower type than q (float16 keys for float32 queries): read as q's."""
    kernels = cpu_kernels_for(q, k_cache)
    if kernels is not None:  # reads keys in place, block by block: no gathered copy of the context
        return kernels.paged_decode_attention(q.contiguous(), k_cache, v_cache, block_tables, context_lens, scale,
                                              window, softcap, sinks)
    return decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale, window, softcap, sinks)


def _softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """softmax over the last dimension; with sinks (shaped to broadcast as one more column), the sink's share
    of the probability is dropped after the softmax."""
    if sinks is None:
        return torch.softmax(scores, dim=-1)
    column = sinks.to(scores.dtype).expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]


def decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale, window=0, softcap=0.0, sinks=None):
    """The same in plain PyTorch (any device): gather each sequence's blocks, mask what it must not see."""
    B, H, D = q.shape
    kv_heads = k_cache.shape[2]
    keys = k_cache[block_tables].flatten(1, 2).to(q.dtype)  # [B, S, kv_heads, D]
    values = v_cache[block_tables].flatten(1, 2).to(q.dtype)
    S = keys.shape[1]
    q = q.view(B, kv_heads, H // kv_heads, D)
    scores = _softcapped(torch.einsum("bkgd,bskd->bkgs", q, keys).float() * scale, softcap)
    key_pos = torch.arange(S, device=q.device)[None, :]
    beyond = key_pos >= context_lens[:, None]  # [B, S]
    if window:
        beyond |= key_pos < context_lens[:, None] - window
    scores = scores.masked_fill(beyond[:, None, None, :], float("-inf"))
    values = values.masked_fill(beyond[:, :, None, None], 0.0)  # never-written slots may hold NaN
    head_sinks = None if sinks is None else sinks.view(1, kv_heads, H // kv_heads, 1)
    probs = _softmax_with_sinks(scores, head_sinks)
    return torch.einsum("bkgs,bskd->bkgd", probs.to(values.dtype), values).reshape(B, H, D)


def _softcapped(scores: torch.Tensor, softcap: float) -> torch.Tensor:
    return torch.tanh(scores / softcap) * softcap if softcap else scores


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, chunk: PrefillChunk,
                      scale: float, window: int = 0, softcap: float = 0.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, heads, head_dim], the chunk's queries (causal within the sequence, within `window` keys of each
    query when there is one) -> [T, heads, head_dim]."""
    T, H, D = q.shape
    kv_heads = k_cache.shape[2]
    group = H // kv_heads
    first = max(0, chunk.start - window + 1) if window else 0  # keys before it are out of every query's window
    keys = k_cache[chunk.block_table].flatten(0, 1)[first : chunk.context_len].transpose(0, 1).to(q.dtype)  # [kv_heads, S, D]
    values = v_cache[chunk.block_table].flatten(0, 1)[first : chunk.context_len].transpose(0, 1).to(q.dtype)
    # queries grouped by the kv head they share: [kv_heads, group * T, D]
    qg = q.view(T, kv_heads, group, D).permute(1, 2, 0, 3).reshape(kv_heads, group * T, D)
    scores = torch.baddbmm(qg.new_zeros(1, 1, 1), qg, keys.transpose(1, 2), beta=0, alpha=scale)
    scores = _softcapped(scores, softcap).masked_fill(chunk.hidden(first, window).repeat(group, 1), float("-inf"))
    head_sinks = None if sinks is None else sinks.view(kv_heads, group, 1, 1).expand(kv_heads, group, T, 1).reshape(kv_heads, group * T, 1)
    out = torch.bmm(_softmax_with_sinks(scores, head_sinks), values)  # [kv_heads, group * T, D]
    return out.view(kv_heads, group, T, D).permute(2, 0, 1, 3).reshape(T, H, D)
