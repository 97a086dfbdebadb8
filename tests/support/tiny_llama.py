"""A tiny random Llama GGUF in mixed ggml types, with a real byte-level BPE vocabulary, written with the
`gguf` package: for the engine's and the quantizer's tests."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf.vocab import bytes_to_unicode

Q = gguf.GGMLQuantizationType
HIDDEN, HEADS, KV_HEADS, FFN, LAYERS, CONTEXT = 64, 4, 2, 128, 2, 512
HEAD_DIM = HIDDEN // HEADS
MERGES = ["h e", "Ġ t", "Ġt he", "i n", "e r"]
CONTROL_TOKENS = ["<|im_start|>", "<|im_end|>"]
# A byte-level BPE vocabulary: the 256 byte symbols, what the merges make, then the chat control tokens.
TOKENS = list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES] + CONTROL_TOKENS
TOKEN_TYPES = [1] * (len(TOKENS) - len(CONTROL_TOKENS)) + [3] * len(CONTROL_TOKENS)  # 1 normal, 3 control
IM_START, IM_END = TOKENS.index("<|im_start|>"), TOKENS.index("<|im_end|>")

# The common ggml types, mixed as a real file mixes them. Layer 0's q/k/v differ
# in type, so compact mode has to fall back to a dense fused projection there; layer 1's share Q4_1.
LAYER_TYPES = [
    {"attn_q": Q.Q4_0, "attn_k": Q.Q4_0, "attn_v": Q.Q8_0, "attn_output": Q.F16,
     "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_1, "ffn_down": Q.Q4_0},
    {"attn_q": Q.Q4_1, "attn_k": Q.Q4_1, "attn_v": Q.Q4_1, "attn_output": Q.Q8_0,
     "ffn_gate": Q.Q8_0, "ffn_up": Q.Q8_0, "ffn_down": Q.BF16},
]
SHAPES = {  # [out, in]
    "attn_q": (HIDDEN, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN),
    "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN),
}


def _add(writer: gguf.GGUFWriter, name: str, values: np.ndarray, qtype: gguf.GGMLQuantizationType) -> None:
    if qtype == Q.F32:
        writer.add_tensor(name, values.astype(np.float32))
    elif qtype == Q.F16:
        writer.add_tensor(name, values.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(values.astype(np.float32), qtype), raw_dtype=qtype)


def write_tiny_llama(
    path: Path,
    *,
    arch: str = "llama",
    tied: bool = True,
    block_count: bool = True,
    tokenizer_model: str = "gpt2",
    pre: str = "smollm",
    seed: int = 0,
    chat: bool = True,
) -> Path:
    """A 2-layer Llama GGUF (hidden 64, 4 heads, 2 kv heads, ffn 128) with random weights in mixed ggml types.

    `tied` leaves out output.weight so the Q8_0 embedding doubles as the output head (as SmolLM2 does)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(CONTEXT)
    if block_count:
        w.add_block_count(LAYERS)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    # chat=False: a base model's vocabulary, with no chat template and no ChatML tokens to fall back on
    w.add_token_list(TOKENS if chat else [{"<|im_start|>": "<s>", "<|im_end|>": "</s>"}.get(t, t) for t in TOKENS])
    w.add_token_types(TOKEN_TYPES)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(IM_START)
    w.add_eos_token_id(IM_END)
    w.add_add_bos_token(False)

    def normal(shape):  # scaled so activations stay O(1) through the layers
        return rng.standard_normal(shape) / np.sqrt(shape[-1])

    _add(w, "token_embd.weight", rng.standard_normal((len(TOKENS), HIDDEN)), Q.Q8_0)
    for i, types in enumerate(LAYER_TYPES):
        for kind, qtype in types.items():
            _add(w, f"blk.{i}.{kind}.weight", normal(SHAPES[kind]), qtype)
        _add(w, f"blk.{i}.attn_norm.weight", 1 + 0.1 * rng.standard_normal(HIDDEN), Q.F32)
        _add(w, f"blk.{i}.ffn_norm.weight", 1 + 0.1 * rng.standard_normal(HIDDEN), Q.F32)
    _add(w, "output_norm.weight", 1 + 0.1 * rng.standard_normal(HIDDEN), Q.F32)
    if not tied:
        _add(w, "output.weight", normal((len(TOKENS), HIDDEN)), Q.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


