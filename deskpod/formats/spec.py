"""ModelSpec: what a decoder LLM is, read once from a GGUF's metadata or a Hugging Face config.json.

The engine builds the model from it, the planner sizes it, the store describes it: one reading, so they
cannot disagree. Both readers map their format's keys onto the same fields, fill in what a format leaves
implicit (llama.cpp hard-codes Gemma 3's five local layers to one global, for instance), and list every
option they do not know in `unknown`, so that a loader can refuse it by name instead of ignoring it.

No torch here: the store and the planner read specs without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

FULL, SLIDING = "full", "sliding"  # attention over the whole context, or over the last `sliding_window` tokens


class SpecError(ValueError):
    """A required value is missing or malformed; the readers' callers turn it into CorruptModel."""


@dataclass(frozen=True)
class RopeSpec:
    """Rotary position embedding, with the long-context variants as transformers defines them."""

    theta: float = 10000.0
    kind: str = "default"  # default, linear, dynamic, yarn, llama3; or what the file names (then refused at load)
    factor: float = 1.0  # linear, dynamic, yarn, llama3
    original_context: int = 0  # the context the model was trained at before scaling
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float = 0.0  # yarn (DeepSeek's variant): with mscale_all_dim, sets the attention factor (0: unset)
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None  # yarn: scales cos and sin; None derives it from factor
    truncate: bool = True  # yarn: round the correction range to whole dimensions


@dataclass(frozen=True)
class ModelSpec:
    architecture: str  # as the file names it: GGUF general.architecture or config.json model_type
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # the MLP's width; for Mixture-of-Experts the width of one expert
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    norm_eps: float = 1e-5
    rope: RopeSpec = RopeSpec()
    local_rope: RopeSpec | None = None  # the rotary of sliding-window layers, when it differs (Gemma 3)
    sliding_window: int = 0  # tokens a sliding layer sees, itself included; 0 = none
    layer_types: tuple[str, ...] = ()  # FULL or SLIDING per layer
    activation: str = "silu"  # of the gated MLP: silu, gelu_tanh
    query_scale: float | None = None  # attention scores are q·k · query_scale^-1/2 (default head_dim)
    attn_softcap: float = 0.0  # scores → cap · tanh(scores / cap); 0 = off
    final_softcap: float = 0.0  # the same on the output logits
    tied_embeddings: bool = False
    # whether q/k/v/o and the MLP's projections have biases; None: as the file's tensors say (GGUF has no flag)
    attention_bias: bool | None = None
    mlp_bias: bool | None = None
    num_experts: int = 0  # Mixture-of-Experts; 0 = dense
    experts_per_token: int = 0
    # the router: a softmax over every expert's logit, the top experts_per_token taken, their weights
    # renormalised to sum to 1 when norm_topk (Mixtral's top-k then softmax is the same as renormalising)
    norm_topk: bool = True
    shared_expert_size: int = 0
    attention_sinks: bool = False  # gpt-oss: a learned logit per head in each softmax's denominator
    swiglu: tuple[float, float] | None = None  # gpt-oss's clamped SwiGLU (alpha, limit), with up + 1
    unknown: tuple[str, ...] = ()  # options the file sets that no reader here understands
    source: str = field(default="", compare=False)  # the file it was read from, for messages

    def __post_init__(self) -> None:
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
        bad = [f"{name} = {getattr(self, name)}" for name in (*sizes, "max_context") if getattr(self, name) <= 0]
        if bad:
            raise SpecError(f"{', '.join(bad)}: these must be positive")
        if self.num_heads % self.num_kv_heads:
            raise SpecError(f"{self.num_heads} heads cannot share {self.num_kv_heads} key/value heads evenly")
        if not self.layer_types:
            kind = SLIDING if self.sliding_window else FULL
            object.__setattr__(self, "layer_types", (kind,) * self.num_layers)
        if self.num_experts and not 1 <= self.experts_per_token <= self.num_experts:
            raise SpecError(f"{self.experts_per_token} experts per token of {self.num_experts}: a Mixture-of-Experts "
                            "model must pick between 1 and all of its experts")
        if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= {FULL, SLIDING}:
            raise SpecError(f"layer types {list(self.layer_types)[:8]}... do not give one of {FULL!r} or {SLIDING!r} "
                            f"to each of the {self.num_layers} layers")

    @property
    def sliding_layers(self) -> int:
        return sum(t == SLIDING for t in self.layer_types) if self.sliding_window else 0

    def rope_of(self, layer: int) -> RopeSpec:
        local = self.layer_types[layer] == SLIDING and self.local_rope is not None
        return self.local_rope if local else self.rope

    def features(self) -> dict[str, str]:
        """The options this model uses beyond a plain Llama, by feature key -> how to name it to a user.
        An architecture declares the keys it implements; the loader refuses any other (never ignores it)."""
        found: dict[str, str] = {}
        for rope in {self.rope, self.local_rope} - {None}:
            if rope.kind != "default":
                found[f"rope:{rope.kind}"] = f"RoPE scaling {rope.kind!r}"
        checks = [
            (self.sliding_window, "sliding_window", f"sliding-window attention ({self.sliding_window} tokens)"),
            (self.local_rope, "local_rope", "a separate RoPE for local layers"),
            (self.activation != "silu", f"activation:{self.activation}", f"MLP activation {self.activation!r}"),
            (self.query_scale, "query_scale", "a query pre-attention scale"),
            (self.attn_softcap, "attn_softcap", f"attention logit softcapping ({self.attn_softcap:g})"),
            (self.final_softcap, "final_softcap", f"final logit softcapping ({self.final_softcap:g})"),
            (self.num_experts, "moe", f"Mixture-of-Experts ({self.num_experts} experts, {self.experts_per_token} per token)"),
            (self.shared_expert_size, "shared_expert", "a shared expert"),
            (self.attention_sinks, "attention_sinks", "attention sinks"),
            (self.swiglu, "clamped_swiglu", "gpt-oss's clamped SwiGLU"),
        ]
        found.update({key: text for active, key, text in checks if active})
        found.update({f"option:{name}": f"the option {name!r}" for name in self.unknown})
        return found


# --- GGUF ---------------------------------------------------------------------------------------------

# `<arch>.<key>` metadata this reader maps onto the spec (or knows to be harmless).
GGUF_KNOWN = frozenset({
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
    "attention.layer_norm_rms_epsilon", "attention.sliding_window", "attention.sliding_window_pattern",
    "rope.freq_base", "rope.freq_base_swa", "rope.dimension_count", "rope.scaling.type", "rope.scaling.factor",
    "rope.scaling.original_context_length", "rope.scaling.finetuned", "rope.scaling.attn_factor",
    "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow",
    "attn_logit_softcapping", "final_logit_softcapping", "expert_count", "expert_used_count",
    "expert_feed_forward_length", "expert_shared_feed_forward_length", "expert_weights_norm", "expert_gating_func",
})


@dataclass(frozen=True)
class GGUFConvention:
    """What llama.cpp hard-codes for an architecture instead of writing it into the file."""

    activation: str = "silu"
    norm_topk: bool = True  # llama.cpp's norm_w for its MoE layers, when the file has no expert_weights_norm
    sliding_pattern: int = 0  # every n-th layer is global, the others local (0: `attention.sliding_window` applies to all)
    local_theta: float | None = None  # RoPE base of local layers
    query_scale: Callable[[dict[str, int]], float] | None = None  # from the shape
    attention_sinks: bool = False  # a learned logit per head in each softmax's denominator (`attn_sinks`)
    swiglu: tuple[float, float] | None = None  # a clamped SwiGLU (alpha, limit) in the experts


def _gemma3_query_scale(shape: dict[str, int]) -> float:
    # llama.cpp: Gemma 3 27B (62 layers) scales by hidden/heads, the others by head_dim (their config.json's
    # query_pre_attn_scalar says the same)
    return shape["hidden"] / shape["heads"] if shape["layers"] == 62 else shape["head_dim"]


GGUF_CONVENTIONS: dict[str, GGUFConvention] = {
    "olmoe": GGUFConvention(norm_topk=False),
    # llama.cpp: every other layer local (the first one), softmax over the top-k router logits, OpenAI's SwiGLU
    "gpt-oss": GGUFConvention(sliding_pattern=2, attention_sinks=True, swiglu=(1.702, 7.0)),
    "gemma3": GGUFConvention("gelu_tanh", sliding_pattern=6, local_theta=10000.0, query_scale=_gemma3_query_scale),
    # the same rule for Gemma 2, whose 27B has 46 layers
    "gemma2": GGUFConvention("gelu_tanh", sliding_pattern=2,
                             query_scale=lambda s: s["hidden"] / s["heads"] if s["layers"] == 46 else s["head_dim"]),
}


def spec_from_gguf(metadata: Mapping[str, Any], has_output: bool, source: str = "") -> ModelSpec:
    """The spec of a GGUF file from its metadata; `has_output`: whether it holds an output.weight (else the
    head is tied to the token embedding)."""
    arch = str(metadata.get("general.architecture") or "unknown")
    prefix = arch + "."
    value = _Values({k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)}, prefix)
    convention = GGUF_CONVENTIONS.get(arch, GGUFConvention())
    layers, hidden, heads = value("block_count", int), value("embedding_length", int), value("attention.head_count", int)
    value("feed_forward_length", int)
    head_dim = value("attention.key_length", int, hidden // heads if heads else 0)
    tokens = metadata.get("tokenizer.ggml.tokens")
    shape = {"hidden": hidden, "heads": heads, "layers": layers, "head_dim": head_dim}
    window = value("attention.sliding_window", int, 0)
    rope = _gguf_rope(value)
    # whatever their value: a key deskpod does not know may mean anything (llama.attention.causal = false does)
    unknown = [k for k in metadata if k.startswith(prefix) and k.removeprefix(prefix) not in GGUF_KNOWN]
    for key in ("attention.value_length", "rope.dimension_count"):  # a value head or a rotary part of its own
        if value(key, int, head_dim) != head_dim:
            unknown.append(prefix + key)
    if value("expert_gating_func", int, 1) != 1:  # 1: softmax; llama.cpp's others (sigmoid, ...) are not run here
        unknown.append(prefix + "expert_gating_func")
    value.check()
    return ModelSpec(
        architecture=arch,
        vocab_size=value("vocab_size", int, len(tokens) if tokens is not None else 0),
        hidden_size=hidden,
        intermediate_size=value("expert_feed_forward_length", int, 0) or value("feed_forward_length", int),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=value("attention.head_count_kv", int, heads),
        head_dim=head_dim,
        max_context=value("context_length", int, 2048),
        norm_eps=value("attention.layer_norm_rms_epsilon", float, 1e-5),
        rope=rope,
        local_rope=_local_rope(rope, value("rope.freq_base_swa", float, convention.local_theta)),
        sliding_window=window,
        layer_types=_gguf_layer_types(value, layers, window, convention),
        activation=convention.activation,
        query_scale=convention.query_scale(shape) if convention.query_scale else None,
        attn_softcap=value("attn_logit_softcapping", float, 0.0),
        final_softcap=value("final_logit_softcapping", float, 0.0),
        tied_embeddings=not has_output,
        num_experts=value("expert_count", int, 0),
        experts_per_token=value("expert_used_count", int, 0),
        norm_topk=bool(value("expert_weights_norm", bool, convention.norm_topk)),
        shared_expert_size=value("expert_shared_feed_forward_length", int, 0),
        attention_sinks=convention.attention_sinks,
        swiglu=convention.swiglu,
        unknown=tuple(unknown),
        source=source,
    )


# GGUF rope.scaling.type -> transformers' rope type ("none" is plain RoPE)
GGUF_ROPE_KINDS = {"none": "default", "linear": "linear", "yarn": "yarn"}


def _gguf_rope(value: _Values) -> RopeSpec:
    # llama.cpp reads a factor without a type as linear scaling
    kind = str(value("rope.scaling.type", str, "linear" if value("rope.scaling.factor", float, 1.0) != 1.0 else "none"))
    return RopeSpec(
        theta=value("rope.freq_base", float, 10000.0),
        kind=GGUF_ROPE_KINDS.get(kind, kind),
        factor=value("rope.scaling.factor", float, 1.0),
        original_context=value("rope.scaling.original_context_length", int, 0),
        beta_fast=value("rope.scaling.yarn_beta_fast", float, 32.0),
        beta_slow=value("rope.scaling.yarn_beta_slow", float, 1.0),
        attention_factor=value("rope.scaling.attn_factor", float, None),
    )


def _local_rope(rope: RopeSpec, theta: float | None) -> RopeSpec | None:
    # local layers rotate at their own base, without the long-context scaling of the global ones
    return RopeSpec(theta=theta) if theta is not None and (theta != rope.theta or rope.kind != "default") else None


def _gguf_layer_types(value: _Values, layers: int, window: int, convention: GGUFConvention) -> tuple[str, ...]:
    if not window:
        return (FULL,) * layers
    pattern = value("attention.sliding_window_pattern", None, None)
    if isinstance(pattern, list):  # newer converters write one flag per layer: true = local
        return tuple(SLIDING if p else FULL for p in pattern)
    every = int(pattern) if pattern is not None else convention.sliding_pattern
    return tuple(FULL if every and (i + 1) % every == 0 else SLIDING for i in range(layers))


# --- Hugging Face config.json ------------------------------------------------------------------------

# Keys that change nothing about the forward pass (bookkeeping, training, generation defaults).
HF_HARMLESS = frozenset({
    "architectures", "model_type", "dtype", "torch_dtype", "transformers_version", "_name_or_path", "name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "initializer_range",
    "use_cache", "attention_dropout", "hidden_dropout", "embd_pdrop", "resid_pdrop", "dropout", "output_attentions",
    "output_hidden_states", "return_dict", "use_return_dict", "torchscript", "tokenizer_class", "id2label", "label2id",
    "problem_type", "task_specific_params", "is_decoder", "is_encoder_decoder", "add_cross_attention",
    "tie_encoder_decoder", "chunk_size_feed_forward", "prefix", "max_length", "min_length", "do_sample",
    "temperature", "top_k", "top_p", "num_beams", "repetition_penalty", "cache_implementation", "quantization_config",
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation", "pretraining_tp",
    "_sliding_window_pattern", "sliding_window_pattern", "max_window_layers", "use_sliding_window",
    "attention_bias", "mlp_bias", "use_bidirectional_attention", "text_config", "vision_config",
    "image_token_index", "boi_token_index", "eoi_token_index", "mm_tokens_per_image", "initializer_factor",
    "layer_types", "rope_parameters", "rope_scaling", "rope_theta", "rope_local_base_freq", "head_dim",
    "hidden_act", "hidden_activation", "query_pre_attn_scalar", "attn_logit_softcapping",
    "final_logit_softcapping", "sliding_window", "tie_word_embeddings", "max_position_embeddings",
    "num_key_value_heads", "num_attention_heads", "num_hidden_layers", "hidden_size", "intermediate_size",
    "vocab_size", "rms_norm_eps", "num_experts", "num_local_experts", "num_experts_per_tok",
    "moe_intermediate_size", "shared_expert_intermediate_size", "router_aux_loss_coef", "output_router_logits",
    "router_jitter_noise", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "use_mrope",
    "experts_per_token", "original_max_position_embeddings", "partial_rotary_factor", "swiglu_alpha", "swiglu_limit",
    # hubs' and tools' bookkeeping, and the generation defaults old configs carried
    "is_llama_config", "transformers.js_config", "unsloth_version", "keys_to_ignore_at_inference", "auto_map",
    "finetuning_task", "use_bfloat16", "tf_legacy_loss", "pruned_heads", "bad_words_ids", "begin_suppress_tokens",
    "suppress_tokens", "forced_bos_token_id", "forced_eos_token_id", "early_stopping", "length_penalty",
    "no_repeat_ngram_size", "num_beam_groups", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "remove_invalid_values", "typical_p", "diversity_penalty", "exponential_decay_length_penalty",
    "encoder_no_repeat_ngram_size", "xla_device", "gradient_checkpointing",
})
HF_HARMLESS_SUFFIXES = ("dropout", "dropout_prob", "pdrop")  # training-time only
# transformers' names for the MLP activation -> ours
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
# The model types whose transformers classes have experts (elsewhere an expert count means nothing to them).
HF_MOE_TYPES = frozenset({"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v2", "deepseek_v3",
                          "phimoe", "granitemoe", "jamba", "dbrx"})
# Architectures whose config, by default, makes every n-th layer global and the others local.
HF_SLIDING_PATTERNS = {"gemma3_text": 6, "gemma3": 6, "gemma2": 2}


def spec_from_hf_config(config: Mapping[str, Any], source: str = "") -> ModelSpec:
    """The spec of a Hugging Face model from its config.json (a multimodal one: its `text_config`);
    transformers 4 (`rope_theta` + `rope_scaling`) and 5 (`rope_parameters`) layouts alike."""
    text = config.get("text_config") or {}
    if not isinstance(text, Mapping):
        raise SpecError(f"text_config = {text!r} is not an object")
    cfg = {**config, **text}
    arch = str(cfg.get("model_type") or "unknown")
    value = _Values(cfg)
    hidden, heads, layers = value("hidden_size", int), value("num_attention_heads", int), value("num_hidden_layers", int)
    head_dim = value("head_dim", int, hidden // heads if heads else 0)
    window = _hf_window(cfg, value)
    rope, local_rope, rope_unknown = _hf_ropes(cfg, value)
    activation = str(cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu")
    # unset (null) keys aside, a key deskpod does not know may change the computation whatever its value
    unknown = [k for k, v in cfg.items() if k not in HF_HARMLESS and not k.endswith(HF_HARMLESS_SUFFIXES) and v is not None]
    unknown += rope_unknown
    if cfg.get("use_bidirectional_attention"):
        unknown.append("use_bidirectional_attention")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        unknown.append("partial_rotary_factor")
    if cfg.get("pretraining_tp", 1) not in (1, None):  # a training-time split, but transformers honours it
        unknown.append("pretraining_tp")
    experts = value("num_local_experts", int, 0) or value("num_experts", int, 0)
    if experts and arch not in HF_MOE_TYPES:  # transformers' dense classes ignore these keys; so must a reader
        unknown += [k for k in ("num_local_experts", "num_experts") if cfg.get(k)]
        experts = 0
    # Qwen-MoE's dense layers among the sparse ones are not built here: refused by name when the config has any
    if cfg.get("mlp_only_layers"):
        unknown.append("mlp_only_layers")
    if cfg.get("decoder_sparse_step") not in (None, 1):
        unknown.append("decoder_sparse_step")
    for key in ("vocab_size", "intermediate_size"):
        value(key, int)
    value.check()
    return ModelSpec(
        architecture=arch,
        vocab_size=value("vocab_size", int),
        hidden_size=hidden,
        intermediate_size=(experts and value("moe_intermediate_size", int, 0)) or value("intermediate_size", int),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=value("num_key_value_heads", int, heads),
        head_dim=head_dim,
        max_context=value("max_position_embeddings", int, 2048),
        norm_eps=value("rms_norm_eps", float, 1e-5),
        rope=rope,
        local_rope=local_rope,
        sliding_window=window,
        layer_types=_hf_layer_types(cfg, arch, layers, window),
        activation=HF_ACTIVATIONS.get(activation, activation),
        query_scale=value("query_pre_attn_scalar", float, None),
        attn_softcap=value("attn_logit_softcapping", float, 0.0),
        final_softcap=value("final_logit_softcapping", float, 0.0),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg["attention_bias"]) if "attention_bias" in cfg else None,
        mlp_bias=bool(cfg["mlp_bias"]) if "mlp_bias" in cfg else None,
        num_experts=experts,
        experts_per_token=value("num_experts_per_tok", int, 0) or value("experts_per_token", int, 0),
        # Mixtral's and gpt-oss's configs have no such key: their top-k-then-softmax is a renormalisation
        # (transformers' Mixtral renormalises whatever its config says)
        norm_topk=arch in ("mixtral", "gpt_oss") or bool(cfg.get("norm_topk_prob", False)),
        attention_sinks=arch == "gpt_oss",
        swiglu=(value("swiglu_alpha", float, 1.702), value("swiglu_limit", float, 7.0)) if arch == "gpt_oss" else None,
        shared_expert_size=value("shared_expert_intermediate_size", int, 0),
        unknown=tuple(unknown),
        source=source,
    )


def _hf_window(cfg: Mapping[str, Any], value: _Values) -> int:
    if cfg.get("use_sliding_window") is False:  # Qwen2 writes a window it does not use
        return 0
    return value("sliding_window", int, 0)


def _hf_layer_types(cfg: Mapping[str, Any], arch: str, layers: int, window: int) -> tuple[str, ...]:
    names = {"full_attention": FULL, "sliding_attention": SLIDING}
    if cfg.get("layer_types") and window:
        given = cfg["layer_types"]
        if not isinstance(given, list) or not all(isinstance(t, str) for t in given):
            raise SpecError(f"layer_types = {given!r} is not a list of names")
        return tuple(names.get(t, t) for t in given)
    if not window:
        return (FULL,) * layers
    every = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or HF_SLIDING_PATTERNS.get(arch, 0))
    if every:
        return tuple(FULL if (i + 1) % every == 0 else SLIDING for i in range(layers))
    first_local = int(cfg.get("max_window_layers") or 0) if cfg.get("use_sliding_window") else 0  # Qwen2
    return tuple(SLIDING if i >= first_local else FULL for i in range(layers))


def _hf_ropes(cfg: Mapping[str, Any], value: _Values) -> tuple[RopeSpec, RopeSpec | None, list[str]]:
    """(global rope, local rope or None, unknown keys), from transformers 5's rope_parameters (one dict, or one
    per layer type) or transformers 4's rope_theta + rope_scaling (+ Gemma 3's rope_local_base_freq)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, Mapping) and "full_attention" in params:
        full = _hf_rope(params["full_attention"] or {}, value("rope_theta", float, 10000.0))
        local = _hf_rope(params.get("sliding_attention") or {}, full[0].theta)
        return full[0], local[0] if local[0] != full[0] else None, full[1] + local[1]
    if isinstance(params, Mapping):
        rope, unknown = _hf_rope(params, value("rope_theta", float, 10000.0))
    else:
        rope, unknown = _hf_rope(cfg.get("rope_scaling") or {}, value("rope_theta", float, 10000.0))
    if cfg.get("original_max_position_embeddings"):  # Phi-3 keeps it beside the rope parameters, and it wins
        rope = replace(rope, original_context=value("original_max_position_embeddings", int))
    local_theta = value("rope_local_base_freq", float, None)
    return rope, _local_rope(rope, local_theta), unknown


# transformers' rope parameter names -> RopeSpec fields (rope_type/type and rope_theta handled apart)
HF_ROPE_FIELDS = {
    "factor": "factor", "original_max_position_embeddings": "original_context", "low_freq_factor": "low_freq_factor",
    "high_freq_factor": "high_freq_factor", "beta_fast": "beta_fast", "beta_slow": "beta_slow", "mscale": "mscale",
    "mscale_all_dim": "mscale_all_dim", "attention_factor": "attention_factor", "truncate": "truncate",
}


def _hf_rope(params: Mapping[str, Any], theta: float) -> tuple[RopeSpec, list[str]]:
    if not isinstance(params, Mapping):
        raise SpecError(f"rope parameters {params!r} are not an object")
    kind = str(params.get("rope_type") or params.get("type") or "default")
    kind = "default" if kind == "none" else kind
    fields = {HF_ROPE_FIELDS[k]: v for k, v in params.items() if k in HF_ROPE_FIELDS and v is not None}
    unknown = [f"rope {k}" for k in params if k not in HF_ROPE_FIELDS and k not in ("rope_type", "type", "rope_theta")]
    try:
        spec = RopeSpec(theta=float(params.get("rope_theta") or theta), kind=kind, **_typed(fields))
    except (TypeError, ValueError) as e:
        raise SpecError(f"rope parameters {dict(params)}: {e}") from None
    return spec, unknown


def _typed(fields: dict[str, Any]) -> dict[str, Any]:
    types = {f.name: f.type for f in RopeSpec.__dataclass_fields__.values()}
    cast = {"float": float, "int": int, "bool": bool, "float | None": float}
    return {k: cast[types[k]](v) for k, v in fields.items()}


# --- shared -----------------------------------------------------------------------------------------


class _Values:
    """value(key, type, default): the value cast to `type`. A required key that is missing is noted (and 0
    returned) so that `check()` can name every missing key at once; a malformed one raises SpecError.
    Per-layer lists must hold one value (deskpod has no per-layer shapes)."""

    REQUIRED = object()

    def __init__(self, values: Mapping[str, Any], prefix: str = ""):
        self.values, self.prefix = values, prefix  # prefix: how messages name the keys' section
        self.missing: list[str] = []

    def __call__(self, key: str, kind: Callable[[Any], Any] | None, default: Any = REQUIRED) -> Any:
        raw = self.values.get(key)
        if raw is None:
            if default is self.REQUIRED:
                self.missing.append(self.prefix + key)
                return 0
            return default
        if kind is None:
            return raw
        if isinstance(raw, list):
            if len(set(raw)) != 1:
                raise SpecError(f"{self.prefix}{key} differs between layers ({raw[:8]}...): per-layer shapes are not supported")
            raw = raw[0]
        try:
            result = kind(raw)
        except (TypeError, ValueError):
            raise SpecError(f"{self.prefix}{key} = {raw!r} is not a valid {getattr(kind, '__name__', kind)}") from None
        if isinstance(result, float) and not math.isfinite(result):
            raise SpecError(f"{self.prefix}{key} = {raw!r} is not finite")
        return result

    def check(self) -> None:
        if self.missing:
            raise SpecError(f"missing {', '.join(self.missing)}")


# --- back to config.json ------------------------------------------------------------------------------

# ModelSpec.architecture -> the config.json model_type and class transformers knows it by
HF_MODEL_TYPES = {
    "llama": ("llama", "LlamaForCausalLM"), "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"), "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"), "gemma3_text": ("gemma3_text", "Gemma3ForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "mixtral": ("mixtral", "MixtralForCausalLM"),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeForCausalLM"), "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "olmoe": ("olmoe", "OlmoeForCausalLM"), "gpt_oss": ("gpt_oss", "GptOssForCausalLM"),
}
_HF_ACTIVATION_NAMES = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}


def spec_to_hf_config(spec: ModelSpec) -> dict[str, Any]:
    """config.json (transformers 4 layout, which 5 reads too) describing `spec`; spec_from_hf_config of it
    gives `spec` back. KeyError for an architecture transformers has no config for."""
    # a GGUF calls Mixtral "llama" (with experts)
    model_type, cls = HF_MODEL_TYPES["mixtral" if spec.architecture == "llama" and spec.num_experts else spec.architecture]
    activation = _HF_ACTIVATION_NAMES[spec.activation]
    config: dict[str, Any] = {
        "architectures": [cls], "model_type": model_type, "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
        "max_position_embeddings": spec.max_context, "rms_norm_eps": spec.norm_eps,
        "hidden_act": activation, "hidden_activation": activation, "tie_word_embeddings": spec.tied_embeddings,
        "rope_theta": spec.rope.theta, "rope_scaling": _hf_rope_scaling(spec.rope), "torch_dtype": "float32",
    }
    if spec.sliding_window:
        names = {FULL: "full_attention", SLIDING: "sliding_attention"}
        config.update(sliding_window=spec.sliding_window, use_sliding_window=True,
                      layer_types=[names[t] for t in spec.layer_types])
    optional = {"attention_bias": spec.attention_bias, "mlp_bias": spec.mlp_bias,
                "rope_local_base_freq": spec.local_rope.theta if spec.local_rope else None,
                "query_pre_attn_scalar": spec.query_scale, "attn_logit_softcapping": spec.attn_softcap or None,
                "final_logit_softcapping": spec.final_softcap or None}
    config.update({k: v for k, v in optional.items() if v is not None})
    if spec.num_experts:
        experts_key = "num_local_experts" if model_type in ("mixtral", "gpt_oss") else "num_experts"
        config.update({experts_key: spec.num_experts, "num_experts_per_tok": spec.experts_per_token,
                       "norm_topk_prob": spec.norm_topk})
        if model_type not in ("mixtral", "gpt_oss"):  # Qwen-MoE: the experts' width apart from the dense one
            config["moe_intermediate_size"] = spec.intermediate_size
    if spec.swiglu:
        config["swiglu_alpha"], config["swiglu_limit"] = spec.swiglu
    return config


def _hf_rope_scaling(rope: RopeSpec) -> dict[str, Any] | None:
    if rope.kind == "default":
        return None
    fields = {v: k for k, v in HF_ROPE_FIELDS.items()}
    defaults = RopeSpec()
    values = {fields[f]: getattr(rope, f) for f in fields if getattr(rope, f) != getattr(defaults, f)}
    return {"rope_type": rope.kind, **values}
