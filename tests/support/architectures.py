"""Tiny random models of every architecture deskpod runs, built offline by transformers from a config alone:
saved as safetensors, and written as GGUF the way llama.cpp's converter writes them — names from the
`gguf` package's own TensorNameMap (not deskpod's table), Llama's q/k rows permuted for adjacent-pair RoPE,
Gemma's norms stored as 1 + w, its metadata keys — so the two formats and transformers can be compared.

Weights are initialised wider than transformers' default (initializer_range 0.1) so that attention is
peaked and logits spread over several units: a feature left out (a window, a bias, a RoPE scaling) then moves
them far beyond the 1e-4 the tests allow.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB = 320
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=False)
WINDOW = 12  # the sliding window of the cases that have one: prompts of 40 tokens run well past it
MOE = {"num_experts": 8, "num_experts_per_tok": 2}


@dataclass(frozen=True)
class Case:
    name: str
    model_type: str  # transformers' config type
    config: dict = field(default_factory=dict)
    gguf: bool = True  # llama.cpp has a GGUF layout for it

    @property
    def gguf_arch(self) -> str:
        return {"mistral": "llama", "mixtral": "llama", "gemma3_text": "gemma3", "qwen3_moe": "qwen3moe"}.get(
            self.model_type, self.model_type)


def _rope(kind: str, **params) -> dict:
    return {"rope_parameters": {"rope_type": kind, "rope_theta": 10000.0, **params}}


CASES = {c.name: c for c in (
    Case("llama", "llama"),
    Case("llama-tied", "llama", {"tie_word_embeddings": True}),
    Case("llama-bias", "llama", {"attention_bias": True, "mlp_bias": True}),
    Case("llama-rope-llama3", "llama", _rope("llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=32)),
    Case("llama-rope-linear", "llama", _rope("linear", factor=4.0)),
    Case("llama-rope-yarn", "llama", _rope("yarn", factor=4.0, original_max_position_embeddings=64)),
    Case("llama-rope-dynamic", "llama", _rope("dynamic", factor=2.0), gguf=False),  # llama.cpp has no dynamic NTK
    Case("mistral", "mistral", {"sliding_window": WINDOW}),
    Case("qwen2", "qwen2"),
    Case("qwen2-sliding", "qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
         gguf=False),  # llama.cpp ignores Qwen2's window, and its converter does not write it
    Case("qwen3", "qwen3", {"head_dim": 32}),
    # llama.cpp hard-codes Gemma 3's pattern (every sixth layer global) and scales queries by head_dim
    Case("gemma3", "gemma3_text", {"num_hidden_layers": 6, "sliding_window": WINDOW, "head_dim": 32,
                                   "query_pre_attn_scalar": 32, "rope_parameters": {
                                       "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
    Case("gemma3-query-scale", "gemma3_text", {"sliding_window": WINDOW, "query_pre_attn_scalar": 24,
                                               "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
         gguf=False),
    Case("gemma2", "gemma2", {"sliding_window": WINDOW, "head_dim": 16, "query_pre_attn_scalar": 16, "tie_word_embeddings": True,
                              "attn_logit_softcapping": 1.5, "final_logit_softcapping": 2.0}),
    # Mixture-of-Experts: 8 experts, 2 per token, so that prompts reach every expert and most go unchosen
    Case("qwen3-moe", "qwen3_moe", {"head_dim": 32, **MOE, "moe_intermediate_size": 64, "norm_topk_prob": True}),
    # llama.cpp always renormalises Qwen3-MoE's top-k weights (as Qwen3-30B-A3B's config asks): safetensors only
    Case("qwen3-moe-unnormalised", "qwen3_moe", {"head_dim": 32, **MOE, "moe_intermediate_size": 64,
                                                 "norm_topk_prob": False}, gguf=False),
    Case("mixtral", "mixtral", {"num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None}),
    Case("olmoe", "olmoe", {**MOE, "norm_topk_prob": False}),
    # gpt-oss in float (llama.cpp's gpt-oss GGUF keeps its experts in MXFP4, not read yet)
    Case("gpt-oss", "gpt_oss", {"num_local_experts": 8, "num_experts_per_tok": 2, "head_dim": 16, "attention_bias": True,
                                "sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                                "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                                                    "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64}},
         gguf=False),
)}


def train_tokenizer() -> Tokenizer:
    """A byte-level BPE of VOCAB tokens with ChatML's special tokens, trained in a moment."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog; hello world 0123456789"] * 20, trainer)
    return tok


def build_hf(case: Case, folder: Path, seed: int = 0) -> Path:
    """The case's model with seeded random weights, saved by transformers, with a tokenizer beside it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(case.model_type, **{**SMALL, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                                                      **case.config})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # biases transformers starts at zero (gpt-oss's experts'): random, so that they count
        for name, param in model.named_parameters():
            if name.endswith("_bias") and not param.any():
                param.normal_(0, 0.1)
    model.save_pretrained(folder)
    train_tokenizer().save(str(folder / "tokenizer.json"))
    tokenizer_config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def hf_logits(folder: Path, sequences: list[list[int]]) -> list[torch.Tensor]:
    """transformers' float32 logits [len, vocab] for each sequence, one at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0] for ids in sequences]


# --- gpt-oss's experts in MXFP4, as OpenAI publishes them -------------------------------------------------

def write_hf_mxfp4(folder: Path, packed: Path, reference: Path) -> None:
    """The gpt-oss model in `folder` with its experts in MXFP4 as OpenAI's checkpoints hold them (`<...>_blocks`
    [experts, out, in/32, 16], `<...>_scales` [experts, out, in/32], quantization_config.quant_method "mxfp4"),
    written to `packed`; and to `reference`, the float model whose experts are exactly those MXFP4 values, as
    transformers' own code dequantizes them. The codes come from the gguf package's MXFP4 quantizer
    (llama.cpp's), its blocks repacked into Hugging Face's order: neither side is deskpod's."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    tensors = load_file(folder / "model.safetensors")
    packed_tensors, reference_tensors = {}, {}
    for name, value in tensors.items():
        if not re.fullmatch(r".*\.mlp\.experts\.(gate_up_proj|down_proj)", name):
            packed_tensors[name] = reference_tensors[name] = value
            continue
        blocks, scales = _hf_mxfp4(value.float().transpose(1, 2))  # stored [experts, in, out]: rows are outputs
        packed_tensors[f"{name}_blocks"], packed_tensors[f"{name}_scales"] = blocks, scales
        reference_tensors[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).contiguous()
    for target, chosen in ((packed, packed_tensors), (reference, reference_tensors)):
        target.mkdir(parents=True, exist_ok=True)
        for extra in folder.iterdir():
            if extra.name != "model.safetensors":
                shutil.copy(extra, target / extra.name)
        save_file(chosen, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (packed / "config.json").write_text(json.dumps(config))


def _hf_mxfp4(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[experts, out, in] float -> Hugging Face's MXFP4 blocks and scales, through gguf's quantizer. A GGUF
    MXFP4 block is its E8M0 scale then 16 bytes: element j in the low nibble of byte j, j + 16 in the high one;
    Hugging Face puts elements 2i and 2i + 1 in byte i's low and high nibbles."""
    experts, out, inp = weights.shape
    raw = gguf.quants.quantize(weights.reshape(-1, inp).numpy(), Q.MXFP4).reshape(experts, out, inp // 32, 17)
    scales, qs = raw[..., 0], raw[..., 1:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [..., 32] in element order
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return torch.from_numpy(blocks), torch.from_numpy(np.ascontiguousarray(scales))


# --- GGUF, as llama.cpp's converter writes it ---------------------------------------------------------

Q = gguf.GGMLQuantizationType
# Mixed block types for the compact path (every row here is a multiple of 32 wide, not of 256)
MIXED_TYPES = {"attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q5_0, "attn_output": Q.Q5_1,
               "ffn_gate": Q.Q8_0, "ffn_up": Q.Q5_0, "ffn_down": Q.Q4_0, "token_embd": Q.Q8_0, "output": Q.Q5_0,
               "ffn_gate_exps": Q.Q8_0, "ffn_up_exps": Q.Q5_1, "ffn_down_exps": Q.Q4_0}


def write_gguf(case: Case, folder: Path, path: Path, quantized: bool = False) -> Path:
    """The saved model as llama.cpp's converter would write it (F32 tensors, or MIXED_TYPES when quantized)."""
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    arch = case.gguf_arch
    w = gguf.GGUFWriter(str(path), arch)
    _metadata(w, config, arch)
    _tokenizer(w, folder, config["vocab_size"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    with safe_open(folder / "model.safetensors", "pt") as f:
        for hf_name, tensor in _stacked_experts(f):
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            assert name is not None, f"llama.cpp has no {arch} name for {hf_name}"
            values = _as_llama_cpp_stores(tensor.float(), name, arch, config)
            _add(w, name, values.numpy(), quantized)
    if config.get("rope_parameters", {}).get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_factors(folder))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_gpt_oss_gguf(folder: Path, path: Path) -> Path:
    """A gpt-oss folder as llama.cpp's converter writes it (arch `gpt-oss`): gate_up split into gate and up
    (rows 0, 2, 4... and 1, 3, 5...) and transposed to [experts, out, in], the experts in MXFP4 by the gguf
    package's quantizer, their biases beside them, the sinks as `attn_sinks.weight`."""
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    w = gguf.GGUFWriter(str(path), "gpt-oss")
    _metadata(w, config, "gpt-oss")
    w.add_expert_feed_forward_length(config["intermediate_size"])
    _tokenizer(w, folder, config["vocab_size"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT_OSS, config["num_hidden_layers"])
    with safe_open(folder / "model.safetensors", "pt") as f:
        for hf_name in f.keys():
            value = f.get_tensor(hf_name).float()
            layer = hf_name.split(".")[2] if hf_name.startswith("model.layers.") else ""
            kind = hf_name.rsplit(".", 1)[-1]
            if kind == "gate_up_proj":  # [experts, in, out]
                stacked = value.transpose(1, 2)
                for part, rows in (("ffn_gate_exps", slice(0, None, 2)), ("ffn_up_exps", slice(1, None, 2))):
                    _add_mxfp4(w, f"blk.{layer}.{part}.weight", stacked[:, rows].contiguous().numpy())
            elif kind == "gate_up_proj_bias":
                w.add_tensor(f"blk.{layer}.ffn_gate_exps.bias", value[:, 0::2].contiguous().numpy())
                w.add_tensor(f"blk.{layer}.ffn_up_exps.bias", value[:, 1::2].contiguous().numpy())
            elif kind == "down_proj":
                _add_mxfp4(w, f"blk.{layer}.ffn_down_exps.weight", value.transpose(1, 2).contiguous().numpy())
            elif kind == "down_proj_bias":
                w.add_tensor(f"blk.{layer}.ffn_down_exps.bias", value.numpy())
            elif kind == "sinks":
                w.add_tensor(f"blk.{layer}.attn_sinks.weight", value.numpy())
            else:
                name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                assert name is not None, f"llama.cpp has no gpt-oss name for {hf_name}"
                w.add_tensor(name, value.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_mxfp4(w: gguf.GGUFWriter, name: str, values: np.ndarray) -> None:
    w.add_tensor(name, gguf.quants.quantize(values.astype(np.float32), Q.MXFP4), raw_dtype=Q.MXFP4)


def _stacked_experts(f):
    """(name, tensor) of a checkpoint, each layer's experts stacked into one [experts, rows, cols] tensor under
    the name without the expert's number, as llama.cpp's converter stores them."""
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for hf_name in f.keys():
        match = re.fullmatch(r"(.*\.experts)\.(\d+)\.(.*)", hf_name)
        if match is None:
            yield hf_name, f.get_tensor(hf_name)
        else:
            experts.setdefault(f"{match[1]}.{match[3]}", {})[int(match[2])] = f.get_tensor(hf_name)
    for name, parts in experts.items():
        yield name, torch.stack([parts[e] for e in sorted(parts)])


def _metadata(w: gguf.GGUFWriter, config: dict, arch: str) -> None:
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    head_dim = config.get("head_dim") or hidden // heads
    if head_dim != hidden // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    rope = config.get("rope_parameters") or {}
    full = rope.get("full_attention", rope)
    if arch != "gemma2":  # llama.cpp's Gemma 2 converter writes no RoPE base (it is 10000)
        w.add_rope_freq_base(full.get("rope_theta", 10000.0))
    if "sliding_attention" in rope:
        w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    if full.get("rope_type") in ("linear", "yarn"):
        w.add_rope_scaling_type(gguf.RopeScalingType(full["rope_type"]))
        w.add_rope_scaling_factor(full["factor"])
    if full.get("rope_type") == "yarn":
        w.add_rope_scaling_orig_ctx_len(full["original_max_position_embeddings"])
    if config.get("sliding_window"):
        w.add_sliding_window(config["sliding_window"])
    experts = config.get("num_experts") or config.get("num_local_experts")
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(config["num_experts_per_tok"])
        if config.get("moe_intermediate_size"):
            w.add_expert_feed_forward_length(config["moe_intermediate_size"])
    for key, add in (("attn_logit_softcapping", w.add_attn_logit_softcapping),
                     ("final_logit_softcapping", w.add_final_logit_softcapping)):
        if config.get(key):
            add(config[key])


def _tokenizer(w: gguf.GGUFWriter, folder: Path, size: int) -> None:
    """The byte-level BPE as a "gpt2" vocabulary, padded to the model's embedding rows as the converter pads."""
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = {**data["model"]["vocab"], **{t["content"]: t["id"] for t in data["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    padding = [f"[PAD{i}]" for i in range(len(tokens), size)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens + padding)
    w.add_token_types([3 if t in SPECIAL else 1 for t in tokens] + [5] * len(padding))
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]])
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])


def _as_llama_cpp_stores(t: torch.Tensor, name: str, arch: str, config: dict) -> torch.Tensor:
    """llama.cpp's converter: Llama's q/k rows interleaved per head (its `permute`), Gemma's norms + 1."""
    if arch == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
        heads = config["num_attention_heads"] if ".attn_q." in name else config["num_key_value_heads"]
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
    if arch.startswith("gemma") and name.endswith("norm.weight"):
        return t + 1
    return t


def _add(w: gguf.GGUFWriter, name: str, values: np.ndarray, quantized: bool) -> None:
    kind = name.split(".")[-2]
    qtype = MIXED_TYPES.get(kind) if quantized and values.ndim >= 2 else None
    if qtype is None:
        w.add_tensor(name, values.astype(np.float32))
    else:
        w.add_tensor(name, gguf.quants.quantize(values.astype(np.float32), qtype), raw_dtype=qtype)


def _llama3_factors(folder: Path) -> np.ndarray:
    """What llama.cpp's converter writes as rope_freqs for Llama 3.1 scaling: per frequency, the divisor taking
    the plain RoPE frequency to the scaled one (transformers' own computation gives both)."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.from_pretrained(folder)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = config.head_dim
    plain = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    return (plain / scaled).numpy().astype(np.float32)


def prompts(count: int, length: int, seed: int = 0) -> list[list[int]]:
    """Random token ids past the special tokens, of lengths around `length`."""
    rng = np.random.default_rng(seed)
    return [rng.integers(len(SPECIAL), VOCAB, size=length - 3 * i).tolist() for i in range(count)]


def write_mixtral_gguf(path: Path, gating: int | None = None) -> Path:
    """A Mixtral as llama.cpp writes it: architecture "llama", expert_count, stacked experts per layer (zeros);
    `gating`: an expert_gating_func (llama.cpp: 1 softmax, 2 sigmoid)."""
    w = gguf.GGUFWriter(str(path), "llama")
    if gating is not None:
        w.add_uint32("llama.expert_gating_func", gating)
    for add, value in ((w.add_context_length, 64), (w.add_embedding_length, 32), (w.add_block_count, 1),
                       (w.add_feed_forward_length, 64), (w.add_head_count, 4), (w.add_head_count_kv, 2),
                       (w.add_expert_count, 4), (w.add_expert_used_count, 2)):
        add(value)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(65 + i) for i in range(16)])
    zeros = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    tensors = {"token_embd.weight": zeros(16, 32), "output_norm.weight": zeros(32), "output.weight": zeros(16, 32),
               "blk.0.attn_norm.weight": zeros(32), "blk.0.ffn_norm.weight": zeros(32),
               "blk.0.attn_q.weight": zeros(32, 32), "blk.0.attn_k.weight": zeros(16, 32),
               "blk.0.attn_v.weight": zeros(16, 32), "blk.0.attn_output.weight": zeros(32, 32),
               "blk.0.ffn_gate_inp.weight": zeros(4, 32), "blk.0.ffn_gate_exps.weight": zeros(4, 64, 32),
               "blk.0.ffn_up_exps.weight": zeros(4, 64, 32), "blk.0.ffn_down_exps.weight": zeros(4, 32, 64)}
    for name, value in tensors.items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
