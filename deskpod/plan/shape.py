"""ModelShape: the numbers of a decoder LLM that memory and speed depend on, and its parameter count.

Every supported model is a stack of `num_layers` blocks, each an attention (grouped-query, RoPE) and a
gated MLP (SwiGLU: gate, up, down), or a mixture of such MLPs ("experts") with a router. A shape comes
from a model file's spec (`from_spec`: a GGUF's metadata or a config.json, read by deskpod.formats.spec as
the engine reads them), the built-in table (`deskpod.plan.builtins`), or a bare size (`dense_of_size`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from deskpod.errors import DeskpodError
from deskpod.formats.spec import ModelSpec, SpecError, spec_from_hf_config


class InvalidPlanInput(DeskpodError):
    """A model, size, context, precision or hardware profile the planner cannot use."""


@dataclass(frozen=True)
class ModelShape:
    name: str
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # the dense MLP's width; for MoE the width of one expert
    vocab_size: int
    max_context: int
    tied_embeddings: bool = False
    num_experts: int = 0  # 0 = dense
    experts_per_token: int = 0
    shared_expert_size: int = 0  # width of the always-on shared expert MLP, 0 = none
    sliding_window: int = 0  # tokens a local-attention layer sees, 0 = none
    sliding_layers: int = 0  # how many of the layers are local
    source: str = ""  # where the numbers come from (a URL, a file)

    def __post_init__(self) -> None:
        required = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                    "intermediate_size", "vocab_size")
        bad = [f for f in required if getattr(self, f) <= 0]
        if bad:
            raise InvalidPlanInput(f"{self.name}: these must be positive: {', '.join(bad)}")
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise InvalidPlanInput(f"{self.name}: experts_per_token must be in 1..{self.num_experts}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    # -- parameter counts: weights of each kind --------------------------------------------------

    @property
    def attention_params(self) -> int:
        """Per layer: q and o are hidden × heads·head_dim, k and v hidden × kv_heads·head_dim."""
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return 2 * self.hidden_size * q + 2 * self.hidden_size * kv

    @property
    def expert_params(self) -> int:
        """One gated MLP (gate, up, down) of `intermediate_size`."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def dense_layer_params(self) -> int:
        """Per layer, the weights every token uses: attention, router, shared expert, norms."""
        router = self.hidden_size * self.num_experts
        shared = 3 * self.hidden_size * self.shared_expert_size
        mlp = 0 if self.is_moe else self.expert_params
        return self.attention_params + router + shared + mlp + 2 * self.hidden_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        """The LM head's own matrix; 0 when it shares the embedding's."""
        return 0 if self.tied_embeddings else self.vocab_size * self.hidden_size

    @property
    def body_params(self) -> int:
        """Weights inside the blocks (quantized at the scheme's body precision)."""
        return self.num_layers * (self.dense_layer_params + self.num_experts * self.expert_params)

    @property
    def total_params(self) -> int:
        return self.body_params + self.embedding_params + self.head_params + self.hidden_size

    @property
    def active_params(self) -> int:
        """Weights one token multiplies by: the blocks' dense part, its experts, and the LM head.
        The embedding is a lookup, not a matmul (the usual convention: gpt-oss-120b 5.1 B)."""
        experts = self.num_layers * self.experts_per_token * self.expert_params
        dense = self.num_layers * self.dense_layer_params
        return dense + experts + self.vocab_size * self.hidden_size + self.hidden_size

    # -- constructors ----------------------------------------------------------------------------

    @classmethod
    def from_spec(cls, spec: ModelSpec, name: str = "", source: str = "") -> ModelShape:
        """The shape of a model whose file a format reader described (deskpod.formats.spec): the same
        reading the engine builds the model from."""
        return cls(
            name=name or spec.architecture,
            architecture=spec.architecture,
            num_layers=spec.num_layers,
            hidden_size=spec.hidden_size,
            num_heads=spec.num_heads,
            num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            intermediate_size=spec.intermediate_size,
            vocab_size=spec.vocab_size,
            max_context=spec.max_context,
            tied_embeddings=spec.tied_embeddings,
            num_experts=spec.num_experts,
            experts_per_token=spec.experts_per_token,
            shared_expert_size=spec.shared_expert_size,
            sliding_window=spec.sliding_window if spec.sliding_layers else 0,
            sliding_layers=spec.sliding_layers,
            source=source or spec.source,
        )

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], name: str, source: str = "") -> ModelShape:
        """Read a Hugging Face config.json (multimodal configs: their `text_config`)."""
        try:
            spec = spec_from_hf_config(config, source)
        except SpecError as e:
            raise InvalidPlanInput(f"{source or name}: {e}") from None
        return cls.from_spec(spec, name, source)

    @classmethod
    def dense_of_size(cls, params: float, name: str = "") -> ModelShape:
        """A dense Llama-shaped model of about `params` parameters.

        Scaling rule (gives Llama 3.1 8B as published, 70B and 405B within 8 % of width and depth): head_dim
        128, at most 8 KV heads, MLP width 3.5 × hidden, vocabulary 128 256 (49 152, SmolLM2's, below
        1 B so the embeddings do not swallow the model), and depth ≈ hidden / 128: of the widths in
        steps of 128, the one whose depth — whatever makes the count come out at `params` — is
        closest to hidden / 128.
        """
        vocab = 128_256 if params >= 1e9 else 49_152

        def shaped(hidden: int, layers: int) -> ModelShape:
            heads = hidden // 128
            return cls(name or f"dense-{params / 1e9:g}b", "llama", layers, hidden, heads, min(8, heads), 128,
                       256 * math.ceil(3.5 * hidden / 256), vocab, 131_072,
                       source="scaling rule in ModelShape.dense_of_size (Llama 3 proportions)")

        def depth(hidden: int) -> int:
            per_layer = shaped(hidden, 1).dense_layer_params
            return max(1, round((params - 2 * vocab * hidden) / per_layer))

        widths = range(128, 128 * 1024, 128)
        hidden = min(widths, key=lambda h: abs(math.log(depth(h) / (h / 128))))
        return shaped(hidden, depth(hidden))
