"""A BERT encoder in plain PyTorch: token + position + segment embeddings, then post-LayerNorm layers of
self-attention and a GELU MLP. Weights come from a Hugging Face `model.safetensors` (never a pickle)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from deskpod.errors import CorruptModel, UnsupportedModel


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text())
        if raw.get("model_type") != "bert":
            raise UnsupportedModel(f"{path}: model_type {raw.get('model_type')!r} is not bert")
        if raw.get("hidden_act", "gelu") != "gelu" or raw.get("position_embedding_type", "absolute") != "absolute":
            raise UnsupportedModel(f"{path}: only gelu activations and absolute positions are supported")
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class Embeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        # input_ids, token_type_ids: [B, T] -> [B, T, H]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(token_type_ids)
        )
        return self.LayerNorm(x)


class Layer(nn.Module):
    """Post-LayerNorm: x = LN(x + attention(x)); x = LN(x + MLP(x))."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.c = c
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)  # query, key, value fused at load time
        self.attn_out = nn.Linear(c.hidden_size, c.hidden_size)
        self.attn_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.up = nn.Linear(c.hidden_size, c.intermediate_size)
        self.down = nn.Linear(c.intermediate_size, c.hidden_size)
        self.mlp_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x: [B, T, H]; mask: [B, 1, 1, T] bool, True where a key is a real token
        B, T, H = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.c.num_attention_heads, self.c.head_dim).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, heads, T, head_dim]
        x = self.attn_norm(x + self.attn_out(a.transpose(1, 2).reshape(B, T, H)))
        return self.mlp_norm(x + self.down(F.gelu(self.up(x))))  # exact (erf) GELU, as BERT's "gelu"


class Bert(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.config = c
        self.embeddings = Embeddings(c)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ):
        # input_ids, attention_mask: [B, T] -> last hidden states [B, T, H]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        mask = attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return x


# Our parameter name -> the Hugging Face names it is made of (several are concatenated along dim 0).
_LAYER_WEIGHTS = {
    "qkv.{p}": ("attention.self.query.{p}", "attention.self.key.{p}", "attention.self.value.{p}"),
    "attn_out.{p}": ("attention.output.dense.{p}",),
    "attn_norm.{p}": ("attention.output.LayerNorm.{p}",),
    "up.{p}": ("intermediate.dense.{p}",),
    "down.{p}": ("output.dense.{p}",),
    "mlp_norm.{p}": ("output.LayerNorm.{p}",),
}


def _state_dict(hf: dict[str, torch.Tensor], c: BertConfig) -> dict[str, torch.Tensor]:
    prefix = "bert." if any(k.startswith("bert.") for k in hf) else ""
    state = {k: v for k, v in hf.items() if k.startswith(f"{prefix}embeddings.") and "position_ids" not in k}
    state = {k.removeprefix(prefix): v for k, v in state.items()}
    for i in range(c.num_hidden_layers):
        for ours, theirs in _LAYER_WEIGHTS.items():
            for p in ("weight", "bias"):
                parts = [hf[f"{prefix}encoder.layer.{i}.{t.format(p=p)}"] for t in theirs]
                state[f"layers.{i}.{ours.format(p=p)}"] = torch.cat(parts)
    return state


def load_bert(folder: Path) -> Bert:
    """The encoder of a Hugging Face BERT folder (config.json + model.safetensors), in float32, eval mode."""
    config = BertConfig.from_json(folder / "config.json")
    model = Bert(config)
    try:
        state = _state_dict(load_file(str(folder / "model.safetensors")), config)
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except (KeyError, RuntimeError) as e:
        raise CorruptModel(f"{folder}: model.safetensors does not hold this BERT's weights: {e}") from e
    return model.eval()
